"""Image loading and transforms: every odd mode becomes sensible RGB, every bad file a clear ImageError."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import ImageError
from retrieval.images import (
    MEAN,
    STD,
    load_image,
    preprocess,
    resize_center_crop,
    to_array,
    to_rgb,
)

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
