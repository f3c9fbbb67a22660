"""The shared image decoder's rules (modes, orientation, frames, rejections) and the resize and encode helpers."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from datasets import noise_image
from PIL import Image

from artifacts.images import (
    DEFAULT_MAX_PIXELS,
    InvalidImageError,
    decode_image,
    encode_image,
    fit_square,
    limit_side,
    to_mode,
)

WHITE = (255, 255, 255)


def encoded(image: Image.Image, image_format: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(int(value) for value in pixel) for pixel in pixels(image).reshape(-1, 3)}


# --- modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_rgb_and_gray_pixels_pass_through(mode):
    source = noise_image((24, 20), mode)
    decoded = decode_image(encoded(source, "PNG"))
    assert decoded.image.mode == mode
    assert decoded.image.size == (24, 20)
    assert decoded.original_format == "PNG"
    assert decoded.original_mode == mode
    np.testing.assert_array_equal(pixels(decoded.image), pixels(source))


@pytest.mark.parametrize(("mode", "image_format"), [("RGB", "PNG"), ("L", "PNG"), ("RGB", "JPEG")])
def test_rgb_and_gray_are_unchanged(mode, image_format):
    decoded = decode_image(encoded(noise_image((24, 20), mode), image_format))
    assert decoded.conversion == ""
    assert decoded.unchanged


def test_one_bit_becomes_gray():
    source = noise_image((16, 12), "L").convert("1")
    decoded = decode_image(encoded(source, "PNG"))
    assert decoded.image.mode == "L"
    assert decoded.original_mode == "1"
    assert "1→L" in decoded.conversion
    assert not decoded.unchanged
    np.testing.assert_array_equal(pixels(decoded.image), np.where(pixels(source), 255, 0))


def test_sixteen_bit_gray_keeps_the_high_byte():
    """PIL's own convert('L') clips 16-bit values at 255, which turns such an image white."""
    rng = np.random.default_rng(0)
    array = rng.integers(1024, 65536, (20, 24)).astype(np.uint16)
    data = encoded(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert (pixels(Image.open(io.BytesIO(data)).convert("L")) == 255).all()  # the naive conversion saturates

    decoded = decode_image(data)
    assert decoded.image.mode == "L"
    assert decoded.original_mode == "I;16"
    assert "I;16→L" in decoded.conversion
    assert not (pixels(decoded.image) == 255).all()
    np.testing.assert_array_equal(pixels(decoded.image), (array >> 8).astype(np.uint8))


def test_full_range_sixteen_bit_gray():
    array = np.linspace(0, 65535, 20 * 24).round().astype(np.uint16).reshape(20, 24)
    decoded = decode_image(encoded(Image.fromarray(array), "PNG"))
    np.testing.assert_array_equal(pixels(decoded.image), (array >> 8).astype(np.uint8))
    assert pixels(decoded.image).min() == 0 and pixels(decoded.image).max() == 255


def test_float_gray_in_unit_range_becomes_gray():
    array = np.linspace(0.0, 1.0, 20 * 24, dtype=np.float32).reshape(20, 24)
    decoded = decode_image(encoded(Image.fromarray(array, mode="F"), "TIFF"))
    assert decoded.image.mode == "L"
    assert decoded.original_mode == "F"
    assert "F→L" in decoded.conversion
    np.testing.assert_array_equal(pixels(decoded.image), np.rint(array * 255).astype(np.uint8))


def test_palette_becomes_rgb():
    source = noise_image((24, 20)).quantize(16)
    assert source.mode == "P"
    decoded = decode_image(encoded(source, "PNG"))
    assert decoded.image.mode == "RGB"
    assert decoded.original_mode == "P"
    assert "P→RGB" in decoded.conversion
    np.testing.assert_array_equal(pixels(decoded.image), pixels(source.convert("RGB")))


def test_palette_with_transparency_is_composited_on_white():
    source = Image.new("P", (4, 2))
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    source.putpixel((3, 1), 1)
    decoded = decode_image(encoded(source, "PNG", transparency=0))  # red is fully transparent
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == WHITE
    assert decoded.image.getpixel((3, 1)) == (0, 0, 255)


def test_rgba_is_composited_on_white():
    array = np.zeros((2, 3, 4), dtype=np.uint8)
    array[0, 0] = (10, 20, 30, 0)  # fully transparent
    array[0, 1] = (10, 20, 30, 255)  # opaque
    array[0, 2] = (0, 0, 0, 128)  # half transparent black over white: mid gray
    decoded = decode_image(encoded(Image.fromarray(array, mode="RGBA"), "PNG"))
    assert decoded.image.mode == "RGB"
    assert decoded.original_mode == "RGBA"
    assert "RGBA→RGB" in decoded.conversion
    assert decoded.image.getpixel((0, 0)) == WHITE
    assert decoded.image.getpixel((1, 0)) == (10, 20, 30)
    assert all(120 <= value <= 135 for value in decoded.image.getpixel((2, 0)))


def test_gray_with_alpha_is_composited_on_white():
    array = np.array([[[40, 0], [40, 255]]], dtype=np.uint8)
    decoded = decode_image(encoded(Image.fromarray(array, mode="LA"), "PNG"))
    assert decoded.image.mode == "L"
    assert decoded.original_mode == "LA"
    assert decoded.image.getpixel((0, 0)) == 255
    assert decoded.image.getpixel((1, 0)) == 40


@pytest.mark.parametrize("image_format", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(image_format):
    source = noise_image((24, 20), "CMYK")
    decoded = decode_image(encoded(source, image_format))
    assert decoded.image.mode == "RGB"
    assert decoded.original_mode == "CMYK"
    assert decoded.original_format == image_format
    assert "CMYK→RGB" in decoded.conversion
    if image_format == "TIFF":  # lossless: exactly PIL's CMYK → RGB
        np.testing.assert_array_equal(pixels(decoded.image), pixels(source.convert("RGB")))


def test_exif_orientation_is_applied():
    """A phone photo is stored sideways with orientation 6 (rotate 90° clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    source = noise_image((30, 10))
    decoded = decode_image(encoded(source, "PNG", exif=exif.tobytes()))
    assert decoded.image.size == (10, 30)
    assert "EXIF orientation applied" in decoded.conversion
    np.testing.assert_array_equal(pixels(decoded.image), pixels(source.transpose(Image.Transpose.ROTATE_270)))

    jpeg = decode_image(encoded(source, "JPEG", exif=exif.tobytes()))
    assert jpeg.image.size == (10, 30)


def test_multi_frame_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (8, 6)
    assert colours(decoded.image) == {(255, 0, 0)}


# --- rejections -----------------------------------------------------------------------------


def rejection(data: bytes, **kwargs) -> str:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, **kwargs)
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


def test_empty_bytes_are_rejected():
    assert "empty" in rejection(b"")


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"id,name\n1,a shirt\n2,a shoe\n" * 20,
    ],
    ids=["random-bytes", "text"],
)
def test_non_images_are_rejected(data):
    assert "not a recognised image" in rejection(data)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_images_are_rejected(image_format):
    data = encoded(noise_image((64, 64)), image_format)
    decode_image(data)  # whole, it is fine
    assert "truncated" in rejection(data[: len(data) // 2])


def png_with_declared_size(width: int, height: int) -> bytes:
    """A real 1×1 PNG whose IHDR claims ``width``×``height`` (CRC fixed): a tiny file, a huge canvas."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_rejected_from_the_header():
    """The patched file holds one pixel of data: rejecting it as too large shows the check ran before decoding."""
    bomb = png_with_declared_size(5000, 5000)
    assert len(bomb) < 100
    assert "truncated" in rejection(bomb, max_pixels=100_000_000)  # decoding it would fail differently
    reason = rejection(bomb, max_pixels=1_000_000)
    assert "too large" in reason and "cap" in reason and "1,000,000" in reason


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (30_000, 30_000), (1, 2**31 - 1)])
def test_huge_declared_canvas_is_rejected_with_the_default_cap(width, height):
    assert width * height > DEFAULT_MAX_PIXELS
    assert "too large" in rejection(png_with_declared_size(width, height))


def test_real_bomb_is_rejected_and_an_image_at_the_cap_passes():
    bomb = encoded(Image.new("L", (9000, 9000)), "PNG")
    assert len(bomb) < 200_000  # a few KB on disk, 81 million pixels decoded
    assert "cap" in rejection(bomb, max_pixels=1_000_000)

    at_cap = decode_image(encoded(Image.new("L", (1000, 1000)), "PNG"), max_pixels=1_000_000)
    assert at_cap.image.size == (1000, 1000)
    assert "cap" in rejection(encoded(Image.new("L", (1000, 1001)), "PNG"), max_pixels=1_000_000)


# --- resize and encode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((100, 50), 40, (40, 20)), ((50, 100), 40, (20, 40)), ((300, 7), 30, (30, 1)), ((64, 64), 32, (32, 32))],
)
def test_limit_side_shrinks_keeping_the_aspect_ratio(size, max_side, expected):
    assert limit_side(noise_image(size), max_side).size == expected


def test_limit_side_never_enlarges():
    image = noise_image((30, 20))
    assert limit_side(image, 30) is image
    assert limit_side(image, 1000) is image
    with pytest.raises(ValueError, match="max_side"):
        limit_side(image, 0)


def test_fit_square_returns_the_size_asked():
    for size in [(100, 50), (50, 100), (7, 300), (10, 10), (3, 2)]:
        assert fit_square(noise_image(size), 16).size == (16, 16)


def test_fit_square_leaves_a_square_of_that_size_untouched():
    image = noise_image((16, 16))
    assert fit_square(image, 16) is image


def thirds(width: int, height: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 3] = (255, 0, 0)
    array[:, width // 3 : 2 * width // 3] = (0, 255, 0)
    array[:, 2 * width // 3 :] = (0, 0, 255)
    return Image.fromarray(array)


def test_fit_square_crops_the_centre():
    cropped = fit_square(thirds(48, 16), 16)  # no resize needed: exactly the middle third
    assert colours(cropped) == {(0, 255, 0)}

    scaled = fit_square(thirds(96, 32), 16)  # halved, then the middle third
    assert scaled.size == (16, 16)
    middle = pixels(scaled)[:, 2:14]
    assert (middle[..., 1] > 200).all() and (middle[..., [0, 2]] < 60).all()

    tall = fit_square(thirds(48, 16).transpose(Image.Transpose.TRANSPOSE), 16)
    assert colours(tall) == {(0, 255, 0)}


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_encode_image_is_deterministic(image_format, mode):
    image = noise_image((32, 24), mode)
    first = encode_image(image, image_format)
    assert first == encode_image(image, image_format)
    assert first == encode_image(noise_image((32, 24), mode), image_format)  # same pixels, another object
    round_trip = decode_image(first)
    assert round_trip.original_format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[image_format]
    assert round_trip.image.mode == (mode if image_format != "webp" else "RGB")  # WebP has no gray mode
    assert round_trip.image.size == (32, 24)
    if image_format == "png":
        np.testing.assert_array_equal(pixels(round_trip.image), pixels(image))


@pytest.mark.parametrize("image_format", ["gif", "PNG", "jpeg", ""])
def test_encode_image_rejects_other_formats(image_format):
    with pytest.raises(ValueError, match="png, jpg or webp"):
        encode_image(noise_image(), image_format)


def test_to_mode():
    gray = noise_image(mode="L")
    colour = to_mode(gray, "RGB")
    assert colour.mode == "RGB"
    assert all((pixels(colour)[..., channel] == pixels(gray)).all() for channel in range(3))
    assert to_mode(gray, "L") is gray
    assert to_mode(colour, "L").mode == "L"
    with pytest.raises(ValueError, match="mode"):
        to_mode(gray, "RGBA")
