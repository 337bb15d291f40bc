"""One image loader for every entry point (library, CLI, server).

:func:`load_image` turns a file path, raw bytes or a binary file object into an upright
``H x W x 3`` RGB ``uint8`` array (C-contiguous, writable), or raises :class:`ImageLoadError`
(a ``ValueError``) whose message names the file and says what was wrong and what is expected.
:func:`validate_image_array` does the same checks for arrays that library users pass in.

Decoding
    The whole file is decoded (``Image.load()``); truncated data is an error.
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set. (A PNG missing only its final ``IEND``
    chunk decodes completely and is accepted: all of its pixels are present.)
Orientation
    The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the array is upright
    as a person sees the photo. Unreadable EXIF data is logged and the pixels are used as
    stored.
Multi-frame files (animated GIF, multi-page TIFF, ...)
    The first frame is used.
Size limit
    ``width * height`` is read from the header (``Image.open`` is lazy) and compared with
    ``max_pixels`` *before* any pixel is decoded. ``DEFAULT_MAX_PIXELS`` (178,956,970 pixels,
    about 13,377 x 13,377; Pillow's own hard limit with its default settings) keeps a small
    malicious file from expanding into gigabytes. Pass a larger ``max_pixels`` to raise it, or
    ``None`` to disable it. Pillow's own decompression-bomb check cannot be switched off here
    (this module never changes global Pillow settings such as ``Image.MAX_IMAGE_PIXELS``):
    images above Pillow's hard limit (``2 * Image.MAX_IMAGE_PIXELS``) are always refused, and
    Pillow's ``DecompressionBombWarning`` is silenced locally (``warnings.catch_warnings``)
    because ``max_pixels`` is the limit that applies; with ``max_pixels=None`` it is logged.

Mode conversions (Pillow mode -> RGB)
    ``RGB``
        unchanged.
    ``1``, ``L``
        gray value replicated into R, G and B (``1`` gives 0 or 255).
    ``LA``, ``La``, ``RGBA``, ``RGBa``, ``PA``, and ``P``/``L``/``RGB``/``1`` with a
    transparency entry (PNG ``tRNS``, GIF transparent index)
        alpha-composited over a **white** background:
        ``out = round((c * a + 255 * (255 - a)) / 255)``; fully transparent pixels become white
        (255, 255, 255). White is what most viewers show behind transparent areas of documents
        and what segmentation of "the visible object" expects.
    ``P`` (palette, no transparency)
        each index replaced by its palette colour.
    ``RGBX``
        padding channel dropped.
    ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, ``I`` (16- and 32-bit integer gray)
        values are read as 16-bit intensities and scaled linearly from the full 16-bit range
        to 8 bits: ``round(v / 257)`` after clipping ``v`` to 0..65535 (65535 -> 255,
        257 * k -> k), then replicated to RGB. Values are *not* stretched to the image's own
        min/max, so dark 16-bit images stay dark. (Pillow itself reads 16-bit-per-channel
        RGB PNGs as 8-bit ``RGB`` by keeping the high byte; that is Pillow's choice.)
        Transparency information of 16-bit gray images is ignored.
    ``F`` (32-bit float)
        min-max scaled over the finite values to 0..255 and rounded; NaN and -inf -> 0,
        +inf -> 255; a constant image -> 0.
    ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``
        converted by Pillow (``Image.convert("RGB")``; CMYK uses Pillow's simple
        ``255 - C - K`` style formula without colour management).
    anything else
        :class:`ImageLoadError`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "image_sha256",
    "load_image",
    "validate_image_array",
]

#: Default ``max_pixels`` of :func:`load_image`: 178,956,970 pixels (about 13,377 x 13,377),
#: which is Pillow's hard decompression-bomb limit with Pillow's default settings
#: (``2 * 89,478,485``). A decoded image of this size takes about 512 MiB as RGB uint8.
DEFAULT_MAX_PIXELS: int = 178_956_970

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

_ALPHA_MODES = frozenset({"LA", "RGBA", "PA"})
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
_PILLOW_CONVERTS = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_INT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_EXPECTED_FORMATS = "an image in a format Pillow can read (PNG, JPEG, TIFF, BMP, GIF, WebP, ...)"


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the source and what was wrong.

    Attributes:
        source: the file path, ``"<bytes>"``, or the name of the file object.
        reason: what was wrong and what is expected.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {source}: {reason}")

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[str, str]]:
        # Keeps the error picklable (it crosses process boundaries in worker pools).
        return (type(self), (self.source, self.reason))


def _source_name(source: object) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    name = getattr(source, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return repr(os.fspath(name))
    return "<file object>"


def _check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is None:
        return
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)):
        raise ValueError(
            f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}"
        )
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels}")


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Loads an image file as an upright ``H x W x 3`` RGB ``uint8`` array.

    Args:
        source: a path (``str`` or ``os.PathLike``), the encoded file as ``bytes``, or a binary
            file object opened for reading (it is read from its current position and not
            closed).
        max_pixels: refuse images with more than this many pixels (``width * height``, read
            from the header before decoding); ``None`` disables this check (Pillow's own hard
            limit still applies, see the module docstring).

    Returns:
        ``H x W x 3`` ``uint8`` RGB array, C-contiguous and writable, EXIF orientation applied.
        Mode conversions are listed in the module docstring.

    Raises:
        ImageLoadError: file missing or unreadable, not an image, truncated or corrupt, too
            large, or in an unsupported mode.
        ValueError: ``max_pixels`` is not a positive int or None.
    """
    _check_max_pixels(max_pixels)
    name = _source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp: str | BinaryIO = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        fp = os.fspath(source)
        if isinstance(fp, bytes):
            fp = os.fsdecode(fp)
    elif hasattr(source, "read"):
        fp = source
    else:
        raise ImageLoadError(
            name,
            f"unsupported source type {type(source).__name__}; expected a path, bytes or a "
            "binary file object",
        )

    with warnings.catch_warnings():
        # max_pixels (checked below) is the limit that applies, so Pillow's soft warning is
        # not shown; its hard DecompressionBombError is still raised and reported. (This
        # changes the process-wide warning filters for the duration of the block.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except FileNotFoundError as exc:
            raise ImageLoadError(name, "file not found; expected an existing image file") from exc
        except IsADirectoryError as exc:
            raise ImageLoadError(name, "is a directory; expected an image file") from exc
        except PermissionError as exc:
            raise ImageLoadError(name, "permission denied; expected a readable image file") from exc
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(
                name,
                f"image is larger than Pillow's decompression-bomb limit ({exc}); that limit "
                "is Pillow's own (2 * PIL.Image.MAX_IMAGE_PIXELS) and max_pixels cannot raise it",
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageLoadError(
                name, f"not a recognised image file; expected {_EXPECTED_FORMATS}"
            ) from exc
        except Exception as exc:  # Pillow raises many types for corrupt headers
            raise ImageLoadError(
                name, f"corrupt image header ({exc}); expected {_EXPECTED_FORMATS}"
            ) from exc

        with im:
            width, height = im.size
            pixels = int(width) * int(height)
            if max_pixels is not None and pixels > max_pixels:
                raise ImageLoadError(
                    name,
                    f"image is {width} x {height} = {pixels:,} pixels, more than the limit "
                    f"max_pixels={max_pixels:,}; pass a larger max_pixels (or max_pixels=None) to "
                    "load_image if this image is trusted",
                )
            if pixels == 0:
                raise ImageLoadError(name, f"image is empty ({width} x {height}); expected pixels")
            if max_pixels is None and Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                logger.warning(
                    "%s: %d pixels exceeds Pillow's decompression-bomb warning threshold %d",
                    name,
                    pixels,
                    Image.MAX_IMAGE_PIXELS,
                )
            try:
                im.seek(0)  # first frame of multi-frame files
                im.load()
            except MemoryError as exc:
                raise ImageLoadError(
                    name, f"not enough memory to decode {width} x {height} pixels"
                ) from exc
            except Exception as exc:
                raise ImageLoadError(
                    name,
                    f"truncated or corrupt image data ({exc}); expected a complete image file",
                ) from exc
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception as exc:
                logger.warning(
                    "%s: unreadable EXIF orientation (%s); using pixels as stored", name, exc
                )
                upright = im
            try:
                return _to_rgb(upright, name)
            finally:
                if upright is not im:
                    upright.close()


def _composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 colour and ``H x W`` uint8 alpha -> ``H x W x 3`` uint8 over white."""
    # c * a + 255 * (255 - a) + 127 <= 65152, so uint16 holds it (half the memory of uint32).
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2), dtype=np.uint8)


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """Pillow image (any supported mode) -> ``H x W x 3`` uint8 RGB, see the module docstring."""
    mode = im.mode
    if mode in _PREMULTIPLIED:
        im = im.convert(_PREMULTIPLIED[mode])
        mode = im.mode
    has_transparency = mode in _ALPHA_MODES or (
        mode in ("P", "L", "RGB", "1") and im.has_transparency_data
    )
    if has_transparency:
        rgba = np.asarray(im.convert("RGBA"))
        return _composite_over_white(rgba[..., :3], rgba[..., 3])
    if mode == "RGB":
        return np.array(im, dtype=np.uint8, order="C")
    if mode in ("1", "L"):
        return _gray_to_rgb(np.asarray(im.convert("L")))
    if mode == "P" or mode in _PILLOW_CONVERTS:
        return np.array(im.convert("RGB"), dtype=np.uint8, order="C")
    if mode in _INT_GRAY_MODES:
        values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return _gray_to_rgb(((values + 128) // 257).astype(np.uint8))
    if mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(im, dtype=np.float64)))
    raise ImageLoadError(
        name,
        f"unsupported image mode {mode!r}; expected one of 1, L, LA, P, PA, RGB, RGBA, RGBX, "
        "CMYK, YCbCr, LAB, HSV, I, I;16, F",
    )


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scales the finite values to 0..255 (NaN, -inf -> 0; +inf -> 255)."""
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if hi > lo:
            scaled = np.rint((values[finite] - lo) * (255.0 / (hi - lo)))
            out[finite] = np.clip(scaled, 0, 255).astype(np.uint8)
    out[np.isposinf(values)] = 255
    return out


def validate_image_array(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Checks a user-supplied image array and returns it as ``H x W x 3`` uint8 RGB.

    Accepted:
        * ``H x W x 3`` uint8: returned as is (the same object when already C-contiguous,
          otherwise a contiguous copy). Channel order is not checked: RGB is assumed.
        * ``H x W`` or ``H x W x 1`` uint8 gray: replicated into three channels.
        * ``H x W x 4`` uint8 RGBA: alpha-composited over white, like files
          (``round((c * a + 255 * (255 - a)) / 255)``).

    Raises:
        ValueError: not a numpy array, empty, not uint8 (bool, float -- including arrays with
            NaN -- and other integer types are refused: whether floats are in 0..1 or 0..255
            is ambiguous), channels-first layout, or another number of channels.
    """
    if not isinstance(image, np.ndarray):
        hint = (
            " (for a PIL image use np.asarray(img.convert('RGB')))"
            if isinstance(image, Image.Image)
            else ""
        )
        raise ValueError(
            f"{name} must be a numpy array of shape H x W x 3 and dtype uint8, got "
            f"{type(image).__name__}{hint}"
        )
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape}); expected H x W x 3 with H, W > 0")
    if image.dtype != np.uint8:
        if image.dtype == np.bool_:
            hint = "convert a binary mask with (img * 255).astype(np.uint8)"
        elif np.issubdtype(image.dtype, np.floating):
            if np.isnan(image).any():
                raise ValueError(
                    f"{name} ({image.dtype}) contains NaN values; expected an H x W x 3 uint8 "
                    "array with values 0..255"
                )
            hint = (
                "float images are ambiguous (0..1 or 0..255?); convert explicitly, e.g. "
                "(img * 255).round().astype(np.uint8) for values in [0, 1] or "
                "img.round().clip(0, 255).astype(np.uint8) for values in [0, 255]"
            )
        else:
            hint = "scale to 0..255 and convert with .astype(np.uint8)"
        raise ValueError(f"{name} must have dtype uint8, got {image.dtype}; {hint}")
    if image.ndim == 2:
        return _gray_to_rgb(image)
    if image.ndim != 3:
        raise ValueError(f"{name} must have shape H x W x 3 (or H x W), got shape {image.shape}")
    channels = image.shape[2]
    if channels == 3:
        return np.ascontiguousarray(image)
    if channels == 1:
        return _gray_to_rgb(image[..., 0])
    if channels == 4:
        return _composite_over_white(image[..., :3], image[..., 3])
    if image.shape[0] in (1, 3, 4):
        raise ValueError(
            f"{name} has shape {image.shape}, which looks channels-first (C x H x W); "
            "expected H x W x 3, e.g. np.transpose(img, (1, 2, 0))"
        )
    raise ValueError(
        f"{name} must have 3 channels (H x W x 3), got shape {image.shape} with {channels} "
        "channels"
    )


def image_sha256(image: np.ndarray) -> str:
    """Hex SHA-256 of an array's dtype, shape and bytes (C order): a content key for caches.

    Equal pixels with equal shape and dtype give equal keys whatever the memory layout.
    """
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}:{arr.shape}:".encode())
    h.update(arr.data.cast("B"))
    return h.hexdigest()
