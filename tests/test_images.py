"""segany.images: loading files of every mode and orientation, refusing bad ones."""

from __future__ import annotations

import io
import logging
import pickle
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from segany.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    image_sha256,
    load_image,
    validate_image_array,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def marked_image(h: int = 40, w: int = 64) -> np.ndarray:
    """Gray landscape image with a red block in the top-left and a blue one top-right."""
    a = np.full((h, w, 3), 128, dtype=np.uint8)
    a[:12, :12] = RED
    a[:12, -12:] = BLUE
    return a


def save(tmp_path: Path, name: str, img: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def close_to(pixel: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(color)).max() <= tol)


# ------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("orientation", "rot90_k", "red_corner"),
    [
        (1, 0, "top-left"),
        (3, 2, "bottom-right"),
        (6, -1, "top-right"),  # stored top-left shows at the top right after 90 deg CW
        (8, 1, "bottom-left"),  # and at the bottom left after 90 deg CCW
    ],
)
def test_exif_orientation_gives_upright_array(tmp_path, orientation, rot90_k, red_corner):
    src = marked_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, "photo.jpg", Image.fromarray(src), exif=exif.tobytes(), quality=95)

    out = load_image(path)
    expected = np.rot90(src, rot90_k)
    assert out.shape == expected.shape
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 4
    corners = {
        "top-left": out[3, 3],
        "top-right": out[3, -4],
        "bottom-left": out[-4, 3],
        "bottom-right": out[-4, -4],
    }
    assert close_to(corners[red_corner], RED)
    for name, pixel in corners.items():
        if name != red_corner:
            assert not close_to(pixel, RED)


# --------------------------------------------------------------------------------- modes


def test_rgb_png_exact(tmp_path):
    src = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = load_image(save(tmp_path, "a.png", Image.fromarray(src)))
    np.testing.assert_array_equal(out, src)


def test_grayscale_replicated(tmp_path):
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    out = load_image(save(tmp_path, "g.png", Image.fromarray(gray)))
    assert out.shape == (12, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_one_bit(tmp_path):
    bits = np.zeros((6, 9), dtype=bool)
    bits[2:4, 3:7] = True
    img = Image.fromarray(bits.astype(np.uint8) * 255).convert("1")
    assert img.mode == "1"
    out = load_image(save(tmp_path, "b.png", img))
    np.testing.assert_array_equal(out[..., 0], bits.astype(np.uint8) * 255)
    np.testing.assert_array_equal(out[..., 2], out[..., 0])


def test_la_composited_over_white(tmp_path):
    la = np.zeros((2, 3, 2), dtype=np.uint8)
    la[0, 0] = (10, 0)  # transparent -> white
    la[0, 1] = (10, 255)  # opaque -> its value
    la[0, 2] = (0, 128)  # half -> (0 * 128 + 255 * 127) / 255 = 127
    img = Image.fromarray(la)
    assert img.mode == "LA"
    out = load_image(save(tmp_path, "la.png", img))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 10, 10]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 30, 0)
    rgba[..., 3] = 255
    rgba[1, 2] = (0, 0, 0, 0)  # fully transparent black -> white, not black
    rgba[2, 3] = (0, 0, 200, 51)  # 20 % blue: (c * 51 + 255 * 204) / 255
    out = load_image(save(tmp_path, "rgba.png", Image.fromarray(rgba)))
    assert out[1, 2].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [200, 30, 0]
    assert out[2, 3].tolist() == [204, 204, round((200 * 51 + 255 * 204) / 255)]


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 2))
    img.putpalette([*RED, *GREEN, *BLUE] + [0, 0, 0] * 253)
    img.putdata([0, 1, 2, 1, 2, 2, 0, 0])
    return img


def test_palette_without_transparency(tmp_path):
    out = load_image(save(tmp_path, "p.png", _palette_image()))
    assert out[0].tolist() == [list(RED), list(GREEN), list(BLUE), list(GREEN)]
    assert out[1, 0].tolist() == list(BLUE)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_becomes_white(tmp_path, fmt):
    out = load_image(save(tmp_path, f"p.{fmt}", _palette_image(), transparency=1))
    assert out[0, 1].tolist() == [255, 255, 255]  # index 1 (green) is transparent
    assert out[0, 0].tolist() == list(RED)
    assert out[0, 2].tolist() == list(BLUE)


def test_gray_with_trns_chunk(tmp_path):
    gray = np.array([[7, 50]], dtype=np.uint8)
    out = load_image(save(tmp_path, "t.png", Image.fromarray(gray), transparency=7))
    assert out[0].tolist() == [[255, 255, 255], [50, 50, 50]]


def test_sixteen_bit_png_scaled_by_257(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 128, 129, 1000]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    path = save(tmp_path, "d.png", img)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    out = load_image(path)
    # 128 / 257 = 0.498 -> 0, 129 / 257 = 0.502 -> 1, 1000 / 257 = 3.89 -> 4
    assert out[0, :, 0].tolist() == [0, 255, 100, 0, 1, 4]
    np.testing.assert_array_equal(out[..., 1], out[..., 0])


def test_thirty_two_bit_integer_clipped_to_sixteen_bit_range(tmp_path):
    values = np.array([[-5, 0, 257 * 7, 70000]], dtype=np.int32)
    img = Image.fromarray(values)
    assert img.mode == "I"
    out = load_image(save(tmp_path, "i.tif", img))
    assert out[0, :, 0].tolist() == [0, 0, 7, 255]


def test_float_min_max_scaled(tmp_path):
    values = np.array([[-2.0, -1.0, 0.0, 2.0]], dtype=np.float32)
    img = Image.fromarray(values)
    assert img.mode == "F"
    out = load_image(save(tmp_path, "f.tif", img))
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]


def test_cmyk_jpeg(tmp_path):
    src = np.zeros((16, 48, 3), dtype=np.uint8)
    src[:, :16], src[:, 16:32], src[:, 32:] = RED, GREEN, (255, 255, 255)
    cmyk = Image.fromarray(src).convert("CMYK")
    path = save(tmp_path, "c.jpg", cmyk, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = load_image(path)
    assert out.shape == (16, 48, 3)
    assert close_to(out[8, 8], RED, 12)
    assert close_to(out[8, 24], GREEN, 12)
    assert close_to(out[8, 40], (255, 255, 255), 12)


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_other_colour_spaces_converted_by_pillow(tmp_path, mode):
    src = marked_image(16, 32)
    path = save(tmp_path, "o.tif", Image.fromarray(src).convert(mode))
    with Image.open(path) as check:
        assert check.mode == mode
        expected = np.asarray(check.convert("RGB"))
    out = load_image(path)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - src.astype(int)).max() <= 30  # Pillow's LAB is lossy


def test_hsv_converted_by_pillow():
    # No file format stores HSV, so the conversion step is checked directly.
    from segany.images import _to_rgb

    hsv = Image.fromarray(marked_image(16, 32)).convert("HSV")
    out = _to_rgb(hsv, "<test>")
    assert out.shape == (16, 32, 3) and out.dtype == np.uint8
    assert close_to(out[3, 3], RED, 3) and close_to(out[3, -4], BLUE, 3)


def test_multiframe_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as check:
        assert check.n_frames == 2
    out = load_image(path)
    assert close_to(out[4, 4], RED, 2)


# -------------------------------------------------------------------------- input kinds


def test_bytes_file_object_and_pathlike_agree(tmp_path):
    src = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    path = save(tmp_path, "x.png", Image.fromarray(src))
    data = path.read_bytes()
    np.testing.assert_array_equal(load_image(str(path)), src)
    np.testing.assert_array_equal(load_image(path), src)
    np.testing.assert_array_equal(load_image(data), src)
    np.testing.assert_array_equal(load_image(bytearray(data)), src)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_image(f), src)
        assert not f.closed
    buf = io.BytesIO(data)
    np.testing.assert_array_equal(load_image(buf), src)
    assert not buf.closed


# ------------------------------------------------------------------------------ refusals


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="not found") as info:
        load_image(path)
    assert "nope.png" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_random_bytes(tmp_path):
    junk = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageLoadError, match="not a recognised image") as info:
        load_image(junk)
    assert "<bytes>" in str(info.value)
    path = tmp_path / "junk.jpg"
    path.write_bytes(junk)
    with pytest.raises(ImageLoadError, match="junk.jpg"):
        load_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png"):
        load_image(path)


@pytest.mark.parametrize(("fmt", "cut"), [("JPEG", 2), ("JPEG", 0.5), ("PNG", 100), ("PNG", 0.5)])
def test_truncated_files_refused(tmp_path, fmt, cut):
    src = np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, fmt)
    data = buf.getvalue()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[:-n])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert "cut." in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_max_pixels_checked_from_header_before_decoding(tmp_path):
    # 2000 x 2000 PNG with its pixel data cut off: only a header check can report the size;
    # decoding first would report truncation instead.
    buf = io.BytesIO()
    Image.new("L", (2000, 2000), 7).save(buf, "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=1_000_000)
    msg = str(info.value)
    assert "big.png" in msg and "4,000,000" in msg and "1,000,000" in msg
    assert "max_pixels" in msg
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path, max_pixels=4_000_000)


def test_max_pixels_allows_images_at_the_limit(tmp_path):
    path = save(tmp_path, "ok.png", Image.new("RGB", (50, 20)))
    assert load_image(path, max_pixels=1000).shape == (20, 50, 3)
    with pytest.raises(ImageLoadError, match="1,000 pixels"):
        load_image(path, max_pixels=999)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_bad_max_pixels(tmp_path, bad):
    path = save(tmp_path, "ok.png", Image.new("RGB", (5, 5)))
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=bad)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` but that holds no pixel data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_without_decoding():
    # 10,000 x 10,000 (100 MB if decoded) is under Pillow's hard limit: max_pixels refuses it.
    with pytest.raises(ImageLoadError, match="100,000,000 pixels"):
        load_image(_png_header_only(10_000, 10_000), max_pixels=1_000_000)
    # 10^10 pixels is over Pillow's own hard limit, which applies even with max_pixels=None.
    bomb = _png_header_only(100_000, 100_000)
    for limit in (1_000_000, None):
        with pytest.raises(ImageLoadError, match="decompression-bomb.*10000000000"):
            load_image(bomb, max_pixels=limit)


def test_pillow_soft_limit_defers_to_max_pixels(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = save(tmp_path, "m.png", Image.new("RGB", (40, 40)))  # 1600: warn zone of Pillow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).shape == (40, 40, 3)
        with caplog.at_level(logging.WARNING, logger="segany.images"):
            assert load_image(path, max_pixels=None).shape == (40, 40, 3)
    assert "decompression-bomb" in caplog.text
    big = save(tmp_path, "n.png", Image.new("RGB", (50, 50)))  # 2500 > 2 * 1000
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(big)


def test_no_global_pillow_or_warning_state_changed(tmp_path):
    filters = list(warnings.filters)
    limit, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    load_image(save(tmp_path, "x.png", Image.new("RGB", (4, 4))))
    with pytest.raises(ImageLoadError):
        load_image(b"junk")
    assert warnings.filters == filters
    assert limit == Image.MAX_IMAGE_PIXELS
    assert truncated == ImageFile.LOAD_TRUNCATED_IMAGES
    assert DEFAULT_MAX_PIXELS == 178_956_970


def test_error_pickles():
    err = ImageLoadError("'a.png'", "file not found")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.source == "'a.png'"


# ------------------------------------------------------------------ validate_image_array


def test_validate_passes_rgb_through():
    a = np.zeros((3, 4, 3), dtype=np.uint8)
    assert validate_image_array(a) is a
    flipped = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)[:, ::-1]
    out = validate_image_array(flipped)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, flipped)


def test_validate_gray_and_rgba():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for g in (gray, gray[..., None]):
        out = validate_image_array(g)
        assert out.shape == (3, 4, 3)
        np.testing.assert_array_equal(out[..., 1], gray)
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (9, 8, 7, 255)
    rgba[0, 1] = (9, 8, 7, 0)
    out = validate_image_array(rgba)
    assert out.tolist() == [[[9, 8, 7], [255, 255, 255]]]


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((3, 4, 3), dtype=bool), "uint8"),
        (np.zeros((3, 4, 3), dtype=np.float32), r"astype\(np.uint8\)"),
        (np.full((3, 4, 3), np.nan), "NaN"),
        (np.zeros((3, 4, 3), dtype=np.uint16), "uint8"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
        (np.zeros((3, 20, 30), dtype=np.uint8), "channels-first"),
        (np.zeros((20, 30, 2), dtype=np.uint8), "3 channels"),
        (np.zeros((2, 3, 4, 3), dtype=np.uint8), "H x W x 3"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_validate_refuses(array, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_image_array(array, name="img")


# --------------------------------------------------------------------------- image_sha256


def test_image_sha256_content_key():
    a = np.random.default_rng(4).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    key = image_sha256(a)
    assert len(key) == 64 and key == image_sha256(a.copy())
    assert image_sha256(np.asfortranarray(a)) == key  # layout does not matter
    b = a.copy()
    b[3, 5, 2] ^= 1
    assert image_sha256(b) != key
    assert image_sha256(a.reshape(6, 4, 3)) != key  # same bytes, other shape
