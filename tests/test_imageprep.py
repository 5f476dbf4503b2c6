"""Image preparation: every odd input kind comes out as an RGB baseline JPEG that TF decodes."""
import io

import numpy as np
import pytest
from PIL import Image

from mlimages import imageprep
from mlimages.imageprep import ImagePrepError, PrepOptions, prepare_image

tf = pytest.importorskip("tensorflow")

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image, fmt, **kwargs):
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def tf_decode(jpeg: bytes) -> np.ndarray:
    return tf.io.decode_jpeg(jpeg, channels=0).numpy()


def is_baseline(jpeg: bytes) -> bool:
    # SOF0 is the baseline frame marker, SOF2 the progressive one.
    return b"\xff\xc0" in jpeg and b"\xff\xc2" not in jpeg


def assert_colour(pixel, expected, tolerance=12):
    assert np.abs(np.asarray(pixel, int) - np.asarray(expected, int)).max() <= tolerance, pixel


def palette_with_transparency():
    image = Image.new("P", (64, 48), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (32, 0, 64, 48))  # right half: blue; left half: transparent index 0
    return encode(image, "PNG", transparency=0)


def rgba_half_transparent_red():
    return encode(Image.new("RGBA", (64, 48), (255, 0, 0, 128)), "PNG")


def grey_16bit(value=40000):
    return encode(Image.fromarray(np.full((48, 64), value, np.uint16)), "PNG")


def cmyk_red():
    return encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)


def animated_gif():
    frames = [Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), GREEN)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def exif_rotated():
    """Stored 96x48, left half red, right half blue, EXIF orientation 6 (rotate 90 clockwise)."""
    image = Image.new("RGB", (96, 48), RED)
    image.paste(BLUE, (48, 0, 96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif)


# kind -> (bytes, expected (height, width), {(y, x): colour})
KINDS = {
    "rgb_jpeg": (encode(Image.new("RGB", (64, 48), GREEN), "JPEG"), (48, 64), {(24, 32): GREEN}),
    "progressive_jpeg": (encode(Image.new("RGB", (64, 48), BLUE), "JPEG", progressive=True),
                         (48, 64), {(24, 32): BLUE}),
    "cmyk_jpeg": (cmyk_red(), (48, 64), {(24, 32): RED}),
    "grey_jpeg": (encode(Image.new("L", (64, 48), 100), "JPEG"), (48, 64),
                  {(24, 32): (100, 100, 100)}),
    "palette_transparent_png": (palette_with_transparency(), (48, 64),
                                {(24, 8): WHITE, (24, 56): BLUE}),
    "palette_png": (encode(Image.new("RGB", (64, 48), RED).quantize(4), "PNG"), (48, 64),
                    {(24, 32): RED}),
    "rgba_png": (rgba_half_transparent_red(), (48, 64), {(24, 32): (255, 127, 127)}),
    "la_png": (encode(Image.new("LA", (64, 48), (0, 0)), "PNG"), (48, 64), {(24, 32): WHITE}),
    "grey_16bit_png": (grey_16bit(40000), (48, 64), {(24, 32): (156, 156, 156)}),
    "bilevel_bmp": (encode(Image.new("1", (64, 48), 1), "BMP"), (48, 64), {(24, 32): WHITE}),
    "animated_gif": (animated_gif(), (48, 64), {(24, 32): RED}),
    "exif_orientation_6": (exif_rotated(), (96, 48), {(10, 24): RED, (86, 24): BLUE}),
    "rgb_webp": (encode(Image.new("RGB", (64, 48), RED), "WEBP", quality=95), (48, 64),
                 {(24, 32): RED}),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_becomes_rgb_baseline_jpeg_that_tf_decodes(kind):
    data, (height, width), colours = KINDS[kind]
    prepared = prepare_image(data, PrepOptions(min_short_side=16))
    pixels = tf_decode(prepared.jpeg)
    assert pixels.shape == (height, width, 3)
    assert (prepared.height, prepared.width) == (height, width)
    assert is_baseline(prepared.jpeg)
    assert b"Exif" not in prepared.jpeg[:200]
    for (y, x), colour in colours.items():
        assert_colour(pixels[y, x], colour)


def test_shorter_side_is_capped_keeping_aspect():
    data = encode(Image.new("RGB", (1000, 600), GREEN), "JPEG")
    prepared = prepare_image(data, PrepOptions(max_short_side=300))
    assert (prepared.height, prepared.width) == (300, 500)
    assert tf_decode(prepared.jpeg).shape == (300, 500, 3)


def test_rotated_photo_is_capped_on_its_upright_shorter_side():
    image = Image.new("RGB", (800, 400), RED)
    exif = Image.Exif()
    exif[0x0112] = 8
    prepared = prepare_image(encode(image, "JPEG", exif=exif), PrepOptions(max_short_side=200))
    assert (prepared.height, prepared.width) == (400, 200)


def test_small_images_are_never_upscaled():
    data = encode(Image.new("RGB", (300, 200), GREEN), "PNG")
    prepared = prepare_image(data, PrepOptions(max_short_side=384))
    assert (prepared.height, prepared.width) == (200, 300)


def test_sample_photos(sample_photos):
    options = PrepOptions()
    for path in sample_photos:
        with open(path, "rb") as handle:
            data = handle.read()
        original = Image.open(io.BytesIO(data))
        prepared = prepare_image(data, options)
        pixels = tf_decode(prepared.jpeg)
        assert pixels.shape == (prepared.height, prepared.width, 3)
        assert min(prepared.height, prepared.width) == min(min(original.size), 384)
        assert is_baseline(prepared.jpeg)


def truncated_jpeg():
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    return data[:len(data) // 2]


@pytest.mark.parametrize("data,options,reason", [
    (b"<html>not found</html>", PrepOptions(), imageprep.UNREADABLE),
    (truncated_jpeg(), PrepOptions(), imageprep.DECODE_ERROR),
    (encode(Image.new("RGB", (10, 10), RED), "PNG"), PrepOptions(), imageprep.TOO_SMALL),
    (encode(Image.new("RGB", (400, 300), RED), "PNG"), PrepOptions(max_pixels=10_000),
     imageprep.TOO_MANY_PIXELS),
])
def test_failures_carry_a_reason(data, options, reason):
    with pytest.raises(ImagePrepError) as caught:
        prepare_image(data, options)
    assert caught.value.reason == reason
