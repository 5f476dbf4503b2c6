"""Is a fetched body a usable image? A full decode with Pillow decides, not the content type.

``Image.verify()`` only walks the chunk structure: a JPEG cut short passes it and fails later, in
the dataset stage. So the image is fully loaded here, after a header-only look at its size that
refuses decompression bombs before any pixel is allocated.
"""
import dataclasses
import io
import logging
import warnings

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# MPO is how Pillow names the multi-picture JPEGs many cameras write: a JPEG with extra frames.
FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp",
           "BMP": "bmp", "TIFF": "tif"}
# Leading bytes of text that servers send with an image content type (error pages, captchas).
TEXT_PREFIXES = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<svg", b"{", b"[")


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """The verdict on one body: ``status`` is ok, not_an_image, corrupt or too_large."""

    status: str
    error: str = None
    format: str = None
    width: int = None
    height: int = None
    animated: bool = None

    @property
    def extension(self) -> str:
        return FORMATS.get(self.format, "bin")


def _looks_like_text(body: bytes) -> bool:
    head = body[:256].lstrip().lower()
    return head.startswith(TEXT_PREFIXES)


def inspect_image(body: bytes, max_pixels: int) -> ImageFacts:
    """Decodes ``body`` fully and reports its real format, size and whether it is animated."""
    if not body:
        return ImageFacts("not_an_image", "empty body")
    if _looks_like_text(body):
        return ImageFacts("not_an_image", "body is HTML or text, not an image")
    with warnings.catch_warnings():
        # Our own pixel limit applies; Pillow's global bomb warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(body)) as image:
                return _decode(image, max_pixels)
        except Image.DecompressionBombError as err:
            return ImageFacts("too_large", f"decompression bomb: {err}")
        except UnidentifiedImageError:
            return ImageFacts("not_an_image", "no image format recognised in the bytes")
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as err:
            # Pillow reports damaged data with any of these, depending on the plugin.
            return ImageFacts("corrupt", f"decode failed: {type(err).__name__}: {err}")


def _decode(image, max_pixels: int) -> ImageFacts:
    width, height = image.size
    fmt = image.format
    if fmt not in FORMATS:
        return ImageFacts("not_an_image", f"unsupported image format {fmt}", fmt, width, height)
    if width <= 0 or height <= 0:
        return ImageFacts("corrupt", f"image has size {width}x{height}", fmt, width, height)
    if width * height > max_pixels:
        return ImageFacts("too_large", f"{width}x{height} pixels is over the limit of "
                          f"{max_pixels}", fmt, width, height)
    animated = bool(getattr(image, "is_animated", False)) and fmt != "MPO"
    if fmt in ("JPEG", "MPO"):
        # Decoding at 1/8 scale still reads every entropy-coded byte (so truncation and damage
        # are caught) but skips most of the inverse DCT: several times less CPU per photo.
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    image.load()  # the full decode; raises on truncated or damaged data
    return ImageFacts("ok", None, fmt, width, height, animated)
