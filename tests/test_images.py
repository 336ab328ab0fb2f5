"""Image loading and transforms: every odd mode becomes sensible RGB, every bad file a clear ImageError."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.images import (
    MEAN,
    STD,
    decode,
    load_image,
    preprocess,
    read_image,
    resize_center_crop,
    to_array,
    to_rgb,
)
from retrieval.errors import ImageError

S = 32


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _photo(w: int = 64, h: int = 48) -> Image.Image:
    """A deterministic colourful RGB image, so crops and jitter have something to change."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=2)
    return Image.fromarray(a.astype(np.uint8))


def _pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


# --- modes -> RGB ---------------------------------------------------------------


def test_palette_png(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    out = load_image(_save(img, tmp_path / "p.png"))
    assert _pixel(out) == (200, 10, 20)


def test_palette_png_with_transparency_goes_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    img.putpixel((1, 1), 1)
    out = load_image(_save(img, tmp_path / "pt.png", transparency=0))
    assert _pixel(out, (0, 0)) == (255, 255, 255)
    assert _pixel(out, (1, 1)) == (200, 10, 20)


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    out = load_image(_save(img, tmp_path / "a.png"))
    assert _pixel(out, (0, 0)) == (10, 20, 30)
    assert _pixel(out, (1, 0)) == (255, 255, 255)


def test_la_composited_on_white():
    img = Image.new("LA", (2, 1), (0, 255))
    img.putpixel((1, 0), (0, 0))
    out = to_rgb(img)
    assert _pixel(out, (0, 0)) == (0, 0, 0)
    assert _pixel(out, (1, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    out = load_image(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "c.jpg"))
    assert out.mode == "RGB"
    assert all(v > 240 for v in _pixel(out))  # no ink is white


def test_16bit_png_mid_grey_maps_to_mid_grey(tmp_path):
    img = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    path = _save(img, tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    assert _pixel(load_image(path)) == (128, 128, 128)


def test_32bit_int_16bit_data_is_scaled():
    img = Image.fromarray(np.full((2, 2), 65535, np.int32))
    assert img.mode == "I"
    assert _pixel(to_rgb(img)) == (255, 255, 255)


def test_float_tiff_scaled_not_clipped(tmp_path):
    a = np.array([[0.0, 0.5, 1.0]], np.float32)
    path = _save(Image.fromarray(a), tmp_path / "f.tif")
    out = load_image(path)
    assert [_pixel(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_outside_unit_range_is_stretched():
    out = to_rgb(Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32)))
    assert [_pixel(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_one_bit_mode(tmp_path):
    img = Image.new("1", (4, 4), 0)
    img.putpixel((1, 1), 1)
    out = load_image(_save(img, tmp_path / "b.png"))
    assert _pixel(out, (0, 0)) == (0, 0, 0)
    assert _pixel(out, (1, 1)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(_photo(40, 20), tmp_path / "o.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


# --- bad files -> ImageError naming the file -------------------------------------


def test_truncated_jpeg(tmp_path):
    path = _save(_photo(64, 64), tmp_path / "cut.jpg", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as e:
        load_image(path)
    assert "cut.jpg" in str(e.value) and "\n" not in str(e.value)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("not an image\n")
    with pytest.raises(ImageError, match=r"x\.jpg.*not a recognised image"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png.*no such file"):
        load_image(tmp_path / "nope.png")


def test_over_max_pixels_names_megapixels(tmp_path):
    path = _save(_photo(20, 20), tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png.*20 x 20.*megapixels.*--max-image-megapixels"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=400).size == (20, 20)


def test_pillow_bomb_limit_is_not_ours(tmp_path, monkeypatch):
    path = _save(_photo(20, 20), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: a warning, not an error
    assert load_image(path).size == (20, 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 px: Pillow refuses outright
    with pytest.raises(ImageError, match=r"bomb\.png"):
        load_image(path)


# --- geometry and arrays ---------------------------------------------------------


@pytest.mark.parametrize("w, h", [(1, 1), (10000, 10), (10, 10000), (64, 48)])
def test_preprocess_shape(w, h):
    out = preprocess(Image.new("RGB", (w, h), (1, 2, 3)), S)
    assert out.shape == (3, S, S) and out.dtype == np.float32


def test_resize_center_crop_keeps_centre():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    out = resize_center_crop(img, 10)
    assert out.size == (10, 10)
    assert np.asarray(out)[:, :, 0].min() > 200


def test_draft_path_gives_same_shape(tmp_path):
    path = _save(_photo(400, 300), tmp_path / "d.jpg")
    drafted = load_image(path, size_hint=S)
    assert min(drafted.size) >= S and drafted.size[0] < 400  # decoded at reduced scale
    assert preprocess(drafted, S).shape == preprocess(load_image(path), S).shape == (3, S, S)


def test_to_array_normalisation():
    v = (10, 128, 250)
    out = to_array(Image.new("RGB", (3, 2), v))
    expected = (np.array(v) / 255 - np.array(MEAN)) / np.array(STD)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None], out.shape), rtol=1e-6)


# --- memory: bounded by the pixel count times a small constant, whatever the mode -----------------


def test_16bit_to_8bit_is_the_rounded_float_formula_for_every_value():
    """Integer arithmetic now (it went through float64 copies of the whole image): the same bytes out."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(np.rint(values.astype(np.float64) * (255 / 65535)), 0, 255).astype(np.uint8)
    got = np.asarray(to_rgb(Image.fromarray(values)))
    assert got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got[:, :, 0], expected)
    np.testing.assert_array_equal(got[:, :, 2], expected)


MEMORY_PROBE = """
import resource, sys
from retrieval.data.images import load_image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = load_image(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024 / (img.size[0] * img.size[1]))
"""


@pytest.mark.parametrize(
    "mode, suffix, bytes_per_pixel",
    [
        ("I;16", "png", 10),  # was 28: the 2-byte source, 8-bit grey, 4-byte RGB (Pillow keeps RGB in 4 bytes)
        ("F", "tif", 14),  # was 29: a 4-byte source
        ("RGB", "png", 6),  # was 8: ImageOps.exif_transpose copied an image with nothing to turn
    ],
)
def test_decoding_peak_memory_is_a_few_bytes_a_pixel(tmp_path, mode, suffix, bytes_per_pixel):
    """Measured in a fresh process (ru_maxrss): tracemalloc does not see Pillow's C allocations."""
    import subprocess
    import sys

    side = 2000
    ramp = np.tile(np.linspace(0, 65535, side)[None, :], (side, 1))
    data = {
        "I;16": ramp.astype(np.uint16),
        "F": (ramp / 65535).astype(np.float32),
        "RGB": np.repeat((ramp / 257).astype(np.uint8)[:, :, None], 3, axis=2),
    }[mode]
    path = _save(Image.fromarray(data), tmp_path / f"big.{suffix}")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True)
    assert float(out.stdout) < bytes_per_pixel


# --- one decode path: a file, its bytes and its PIL image ------------------------------------------


def test_bytes_and_a_path_decode_alike(tmp_path):
    path = _save(_photo(400, 300), tmp_path / "d.jpg")
    with open(path, "rb") as f:
        from_bytes = read_image(io.BytesIO(f.read()), "the uploaded image", size_hint=S)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path, size_hint=S)))


def test_an_opened_jpeg_is_drafted_like_its_file_and_a_decoded_one_reduced_alike(tmp_path):
    path = _save(_photo(400, 300), tmp_path / "d.jpg")
    by_path = load_image(path, size_hint=S)
    assert by_path.size == (50, 38)  # drafted at 1/8
    assert np.array_equal(np.asarray(decode(Image.open(path), S)), np.asarray(by_path))
    decoded = Image.open(path)
    decoded.load()
    reduced = decode(decoded, S)
    assert reduced.size == by_path.size and np.abs(np.asarray(reduced, np.int16) - np.asarray(by_path)).mean() < 4
    assert decode(by_path, S) is by_path  # decoding twice changes nothing
    small = Image.open(_save(_photo(20, 20), tmp_path / "s.jpg"))
    small.load()
    assert decode(small, S).size == (20, 20)  # smaller than the hint: nothing to reduce


def test_an_upload_over_the_bound_says_so_in_its_own_words():
    buf = io.BytesIO()
    _photo(20, 20).save(buf, "PNG")
    with pytest.raises(ImageError, match=r"^cannot read the uploaded image: it is 20 x 20"):
        read_image(buf, "the uploaded image", max_pixels=100)
