"""Untrusted image bytes → a validated 8-bit gray or RGB picture, and the resize policy.

Every stage that reads an image someone else made goes through `decode_image`:
ingest (files from a user's folder), `verify` and the data streams (samples in
shards), and the service (bytes from the network). One decoder means one set
of rules: what counts as an image, how big one may be, how odd modes become
RGB. It lives in `serving` because the service must run without torch; the
pipeline imports it from here.

The rules:

- The pixel count and the decoded size (width × height × the bytes per pixel
  Pillow holds for the mode) are checked from the header, before any pixel is
  decoded, so a decompression bomb (a small file declaring a huge canvas, or a
  16-bit one) costs nothing; conversions to 8-bit work in place, so a decoded
  image costs a small multiple of its decoded size, never 8 bytes a pixel.
- Everything is fully decoded (``load``), so truncated data fails here, not
  later in a training worker.
- EXIF orientation is applied: a phone photo is stored sideways with a tag.
- Modes become 8-bit ``L`` (gray stays gray: lossless and a third of the
  bytes) or ``RGB``: 1-bit → L; 16- and 32-bit integer gray → L by keeping the
  high byte; float gray in [0, 1] → L; palette → RGB (through RGBA when it has
  transparency); CMYK and YCbCr/LAB → RGB; alpha (RGBA, LA, PA) is
  composited on white, the usual background of product photos.
- Multi-frame files (GIF, TIFF, WebP animations) give their first frame.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 × 8000: above any camera's output, far below a bomb's canvas
MAX_BYTES_PER_PIXEL = 4  # the most Pillow holds a pixel in (RGBA, I, F; RGB is padded to 4)
_CONVERTED_THROUGH_RGB = frozenset({"P", "PA"})  # decoded at 1-2 bytes a pixel, converted to RGB(A) before use
_EXIF_ORIENTATION = 0x0112
FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # what shards store


class InvalidImageError(ValueError):
    """The bytes are not a usable image; ``str(error)`` is the one-line reason."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, validated picture in mode ``L`` or ``RGB``.

    ``original_format`` is PIL's name for the file's format (``PNG``, ``JPEG``,
    ...) and ``conversion`` says what was done to reach the stored mode, e.g.
    ``"CMYK→RGB"``, or is empty when the pixels are exactly the file's.
    """

    image: Image.Image
    original_format: str
    original_mode: str
    conversion: str

    @property
    def unchanged(self) -> bool:
        return not self.conversion


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """What Pillow allocates to hold a ``width`` × ``height`` image of ``mode``: known from the header alone.

    Multi-band modes take 4 bytes a pixel (Pillow pads RGB to 32 bits); single-band ones their sample size
    (16-bit gray 2, ``I``/``F`` 4). Palette modes, whose conversion goes through RGB or RGBA, are
    charged as what they become, 4; so is a mode Pillow does not describe.
    """
    try:
        descriptor = ImageMode.getmode(mode)
    except KeyError:
        return width * height * MAX_BYTES_PER_PIXEL
    if mode in _CONVERTED_THROUGH_RGB:
        return width * height * MAX_BYTES_PER_PIXEL
    per_pixel = MAX_BYTES_PER_PIXEL if len(descriptor.bands) > 1 else np.dtype(descriptor.typestr).itemsize
    return width * height * per_pixel


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int | None = None
) -> DecodedImage:
    """Decode ``data`` fully into an 8-bit ``L`` or ``RGB`` image, or raise `InvalidImageError`.

    ``max_decoded_bytes`` caps `decoded_bytes` (None: ``max_pixels`` × 4, which no mode within the pixel cap
    can pass, so callers that cap only pixels keep their behaviour).
    """
    byte_cap = max_pixels * MAX_BYTES_PER_PIXEL if max_decoded_bytes is None else max_decoded_bytes
    if not data:
        raise InvalidImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice its own cap raises) on big canvases; our own cap is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidImageError(f"image has no pixels ({width}×{height})")
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"image too large: {width}×{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,}"
                )
            size = decoded_bytes(width, height, image.mode)
            if size > byte_cap:
                raise InvalidImageError(
                    f"image too large: {width}×{height} {image.mode} decodes to {size:,} bytes, "
                    f"over the cap of {byte_cap:,}"
                )
            image_format = image.format or "unknown"
            original_mode = image.mode
            image.seek(0)
            image.load()
            return _normalise_mode(image, image_format, original_mode)
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError("not a recognised image format") from None
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"image too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidImageError(f"corrupt or truncated image data ({reason})") from None


def _normalise_mode(image: Image.Image, image_format: str, original_mode: str) -> DecodedImage:
    steps: list[str] = []
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):  # exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
        steps.append("EXIF orientation applied")
    mode = image.mode
    if mode in ("L", "RGB"):
        converted = image
    elif mode == "1":
        converted = image.convert("L")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        converted = _gray_to_8_bit(image)
    elif mode == "P":
        has_alpha = "transparency" in image.info
        converted = _on_white(image.convert("RGBA")) if has_alpha else image.convert("RGB")
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        converted = _on_white(image.convert("RGBA" if mode not in ("LA", "La") else "LA"))
    else:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        converted = image.convert("RGB")
    if converted.mode != mode:
        steps.append(f"{mode}→{converted.mode}")
    return DecodedImage(converted, image_format, original_mode, ", ".join(steps))


def _gray_to_8_bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer gray keeps its high byte (scaled by 1/256); float gray in [0, 1] is scaled by 255.

    PIL's own ``convert("L")`` clips such values at 255 instead, which turns
    most 16-bit images white.

    Every step works in place on one writable copy of the samples (2 or 4 bytes a pixel), then narrows to
    uint8: widening to int64 first cost 8 bytes a pixel per temporary, 1.1 GB for a 75 KB 6300×6300 PNG.
    """
    pixels = np.array(image)  # a writable copy in the image's own dtype
    if pixels.dtype.kind == "f":
        np.nan_to_num(pixels, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        if pixels.max(initial=0.0) <= 1.0:
            pixels *= 255.0
        np.rint(pixels, out=pixels)
    elif pixels.max(initial=0) > 255:
        np.right_shift(pixels, 8, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an ``RGBA`` or ``LA`` image over a white background, dropping alpha."""
    gray = image.mode == "LA"
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # made in RGBA: no converted copy of it
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    return Image.alpha_composite(background, rgba).convert("L" if gray else "RGB")


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``L`` or ``RGB`` as asked (gray replicated, colour to ITU-R 601 luma)."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB'; got {mode!r}")
    return image if image.mode == mode else image.convert(mode)


def limit_side(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most ``max_side``, keeping the aspect ratio."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1; got {max_side}")
    width, height = image.size
    longer = max(width, height)
    if longer <= max_side:
        return image
    size = (max(1, round(width * max_side / longer)), max(1, round(height * max_side / longer)))
    return image.resize(size, Image.Resampling.LANCZOS)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """The evaluation and serving resize policy: shorter side → ``size`` (bilinear, antialiased), centre crop.

    An image already ``size``×``size`` is returned untouched. The crop box's
    origin is ``floor((side - size) / 2)``, as torchvision's ``CenterCrop``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """PNG (lossless), JPEG (quality 95) or WebP (quality 95): deterministic bytes for the same pixels."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif image_format == "jpg":
        image.save(buffer, format="JPEG", quality=95, subsampling=0 if image.mode == "RGB" else -1)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=95, method=4)
    else:
        raise ValueError(f"image format must be png, jpg or webp; got {image_format!r}")
    return buffer.getvalue()
