"""Turns downloaded image bytes into the training form: 8-bit RGB baseline JPEG, size capped.

Whatever arrives (CMYK or greyscale JPEG, palette PNG with transparency, 16-bit PNG, RGBA,
animated GIF/WebP, rotated phone photos) leaves as a baseline JPEG that ``tf.io.decode_jpeg``
decodes to ``[height, width, 3]`` uint8, so the training input pipeline needs one decoder and
no special cases (upstream stored GIF bytes as they came, and training then failed on them).
"""
import dataclasses
import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Reason codes of a rejected image (the ``reason`` column of the dataset job's rejects table).
UNREADABLE = "unreadable"          # not an image Pillow can identify
DECODE_ERROR = "decode_error"      # identified, but the pixel data is truncated or corrupt
TOO_MANY_PIXELS = "too_many_pixels"  # larger than max_pixels: a decompression bomb or absurd size
TOO_SMALL = "too_small"            # shorter side below min_short_side
ENCODE_ERROR = "encode_error"      # could not be written as JPEG (should not happen)
REASONS = (UNREADABLE, DECODE_ERROR, TOO_MANY_PIXELS, TOO_SMALL, ENCODE_ERROR)


@dataclasses.dataclass(frozen=True)
class PrepOptions:
    """How images are prepared; the ``dataset`` profile section sets these."""
    # 384 leaves room for 299-pixel crops after the upstream random crop (area >= 0.7).
    max_short_side: int = 384
    min_short_side: int = 32
    max_pixels: int = 100_000_000
    jpeg_quality: int = 90
    # Transparent pixels are composited onto this colour (white, like a browser page).
    background: tuple = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    height: int
    width: int
    source_format: str
    source_mode: str


class ImagePrepError(Exception):
    """An image that cannot be prepared; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def prepare_image(data: bytes, options: PrepOptions = PrepOptions()) -> PreparedImage:
    """Decodes ``data`` and returns it as an RGB baseline JPEG; raises :class:`ImagePrepError`."""
    image = _open(data, options)
    source_format, source_mode = image.format or "", image.mode
    target = _target_size(image.size, options)
    try:
        if image.format == "JPEG":
            # DCT-domain downscaling while decoding: much faster for large photos.
            image.draft(image.mode, target)
        image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image, options.background)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImagePrepError(DECODE_ERROR, str(err)) from None
    # Orientation may have swapped the sides: recompute the target on the upright image.
    target = _target_size(image.size, options)
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return PreparedImage(_encode(image, options.jpeg_quality), image.height, image.width,
                         source_format, source_mode)


def _open(data: bytes, options: PrepOptions) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImagePrepError(TOO_MANY_PIXELS, str(err)) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImagePrepError(UNREADABLE, str(err)) from None
    width, height = image.size
    if width * height > options.max_pixels:
        raise ImagePrepError(TOO_MANY_PIXELS, f"{width}x{height} > {options.max_pixels} pixels")
    if min(width, height) < options.min_short_side:
        raise ImagePrepError(TOO_SMALL, f"{width}x{height}, shorter side < "
                                        f"{options.min_short_side}")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animations: the first frame only
    return image


def _target_size(size, options: PrepOptions):
    """``size`` scaled so the shorter side is at most ``max_short_side``; never enlarged."""
    width, height = size
    short = min(width, height)
    if short <= options.max_short_side:
        return width, height
    scale = options.max_short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """8-bit RGB version of ``image``: alpha flattened on ``background``, 16-bit scaled down."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    # CMYK, YCbCr, LAB, HSV, L, 1 and P without transparency: Pillow's own conversion.
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer / float) greyscale to 8-bit, full range mapped linearly."""
    pixels = np.asarray(image, dtype=np.float64)
    # 16-bit PNGs arrive as "I" or "I;16" with values up to 65535; 8-bit content in "I" stays.
    top = 65535.0 if pixels.max(initial=0) > 255 else 255.0
    grey = np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    try:
        # Baseline (not progressive), no EXIF: orientation is already applied to the pixels.
        image.save(out, "JPEG", quality=quality, progressive=False, optimize=False)
    except (OSError, ValueError) as err:
        raise ImagePrepError(ENCODE_ERROR, str(err)) from None
    return out.getvalue()
