"""Image loading and transforms: file -> RGB PIL image -> normalised float32 (3, H, W).

Numpy and Pillow only, so indexing and serving never pay for a torch import here.
Every unreadable file becomes one `ImageError` that names it and says what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageError

ImageArray: TypeAlias = npt.NDArray[np.float32]  # (3, H, W), normalised with MEAN/STD

# CLIP's statistics, so pretrained towers see the inputs they were trained on.
MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# Same as Pillow's default bomb limit, but checked by us so callers can raise it per call.
DEFAULT_MAX_PIXELS = 89_478_485

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str | Path, size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file as RGB with EXIF orientation applied (see `read_image`).

    Decoding everything here means a corrupt or truncated file fails now, with its
    name, rather than as a bare PIL error deep inside a training or indexing batch.
    """
    try:
        with open(path, "rb") as f:
            return read_image(f, f"image {path}", size_hint, max_pixels)
    except ImageError:
        raise
    except Exception as e:  # open() itself: missing, a directory, no permission
        raise ImageError(f"cannot read image {path}: {_describe(e)}") from e


def read_image(
    f: BinaryIO, what: str, size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an open file (a path's, or an upload's bytes) as RGB; errors say `cannot read {what}: ...`.

    The one decode path for files, uploads and PIL images (`decode`), so the same bytes give the
    same pixels, and so the same vector, whichever way they arrive.
    """
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's global warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(f)
        _check_pixels(what, img.size, max_pixels)  # header only: nothing decoded yet
        return decode(img, size_hint)
    except ImageError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageError(f"cannot read {what}: {_describe(e)}") from e


def decode(img: Image.Image, size_hint: int | None = None) -> Image.Image:
    """A PIL image, opened or already decoded -> RGB, EXIF orientation applied: what `read_image` gives.

    `size_hint` lets a JPEG decode at a reduced scale (`Image.draft`: a 4000x3000 photo in a third of the
    time) that stays >= size_hint per side. A JPEG still undecoded is drafted as a file is (in place, as
    Pillow's own `thumbnail` does), so it gives the file's pixels exactly; one decoded at full scale is
    box-reduced by the factor the draft would have used, the nearest a decoded image can come (libjpeg's
    scaled IDCT is not a box filter). A drafted JPEG (`decoderconfig`), another format or an image without
    one is taken as it is, so decoding twice changes nothing.
    """
    if size_hint is not None and img.format == "JPEG" and not getattr(img, "decoderconfig", ()):
        img = _at_draft_scale(img, size_hint)
    img.load()
    # Only when there is something to turn: with nothing to do, exif_transpose returns a copy (4 bytes a pixel).
    img = ImageOps.exif_transpose(img) if _needs_turning(img) else img
    return to_rgb(img)


def _at_draft_scale(img: Image.Image, size_hint: int) -> Image.Image:
    """A JPEG drafted if still undecoded (`tile` is what is left to decode), else box-reduced by the same factor."""
    if isinstance(img, ImageFile.ImageFile) and img.tile and img.draft("RGB", (size_hint, size_hint)) is not None:
        return img
    img.load()
    scale = draft_scale(img.size, size_hint)
    return img.reduce(scale) if scale > 1 else img


def draft_scale(size: tuple[int, int], size_hint: int) -> int:
    """The factor `JpegImageFile.draft` decodes at for this size hint: 8, 4, 2 or 1."""
    fits = min(size[0] // size_hint, size[1] // size_hint)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def _needs_turning(img: Image.Image) -> bool:
    return img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)


def _check_pixels(what: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse huge images before decoding, since decoding one can exhaust memory."""
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"cannot read {what}: it is {w} x {h} = {w * h / 1e6:.3g} megapixels, "
            f"over the limit of {max_pixels / 1e6:.3g} megapixels "
            "(raise --max-image-megapixels or downscale it)"
        )


def _describe(e: Exception) -> str:
    """One line saying what is wrong with the file and what to do about it."""
    if isinstance(e, FileNotFoundError):
        return "no such file (check the path)"
    if isinstance(e, IsADirectoryError):
        return "it is a directory, not a file (check the path)"
    if isinstance(e, PermissionError):
        return "permission denied (check the file's permissions)"
    if isinstance(e, UnidentifiedImageError):
        return "not a recognised image format (remove it or convert it to JPEG/PNG)"
    if isinstance(e, Image.DecompressionBombError):
        return f"{_one_line(e)} (downscale it)"
    if "truncated" in str(e):
        return "file is truncated (re-copy or remove it)"
    return f"file is corrupt: {_one_line(e)} (re-copy or remove it)"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB.

    Transparency is composited on white, because transparent areas show as white in
    viewers (black would invent dark regions). High-bit-depth and float images are
    rescaled, since Pillow's own convert clips them to garbage; they go a band of rows
    at a time, so a 40-megapixel 16-bit PNG costs its RGB result, not float64 copies of it.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _UINT16_MODES:
        return _gray_rows_to_rgb(img, _uint16_to_uint8)
    if img.mode in ("I", "F"):
        offset, factor = _rescale_to_255(*_value_range(img), img.mode == "F")
        return _gray_rows_to_rgb(img, lambda rows: _to_uint8((_finite(rows) - offset) * factor))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # P, CMYK, 1, L, YCbCr, LAB, HSV


CHUNK_PIXELS = 1 << 20  # the rows converted at once: a few MB of temporaries whatever the image's size


def _row_bands(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(top, rows as an array) down the image, about CHUNK_PIXELS at a time: `np.asarray(img)` would copy it all."""
    w, h = img.size
    step = max(1, CHUNK_PIXELS // max(w, 1))
    for top in range(0, h, step):
        yield top, np.asarray(img.crop((0, top, w, min(top + step, h))))  # (rows, W)


def _gray_rows_to_rgb(img: Image.Image, to_uint8: Callable[[np.ndarray], npt.NDArray[np.uint8]]) -> Image.Image:
    """A one-band image -> 8-bit grey, band by band, then RGB."""
    gray = np.empty((img.size[1], img.size[0]), np.uint8)  # (H, W)
    for top, rows in _row_bands(img):
        gray[top : top + len(rows)] = to_uint8(rows)
    return Image.fromarray(gray).convert("RGB")


def _uint16_to_uint8(rows: np.ndarray) -> npt.NDArray[np.uint8]:
    """round(v * 255 / 65535) in integers: that is round(v / 257), which never ties, so (v + 128) // 257."""
    return ((rows.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _finite(rows: np.ndarray) -> npt.NDArray[np.float64]:
    return np.nan_to_num(rows.astype(np.float64))


def _to_uint8(a: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _value_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of the finite-ised values, a band at a time; (0, 0) for an empty image."""
    lo, hi = np.inf, -np.inf
    for _, rows in _row_bands(img):
        if rows.size:
            finite = _finite(rows)
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _rescale_to_255(lo: float, hi: float, is_float: bool) -> tuple[float, float]:
    """(offset, factor) mapping values onto 0-255 as (v - offset) * factor, by the smallest usual range that holds them.

    Floats in 0-1 and integers in 0-255 or 0-65535 keep their absolute brightness;
    anything else (negatives, HDR, 32-bit counts) is stretched from its min to its max.
    """
    if lo >= 0:
        ranges = ((1.0,) if is_float else ()) + (255.0, 65535.0)
        for top in ranges:
            if hi <= top:
                return 0.0, 255 / top
    return (lo, 255 / (hi - lo)) if hi > lo else (lo, 0.0)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (bicubic) and keep the centred square.

    Cropping the square in source coordinates and resizing once is the same result,
    but never builds the huge intermediate a 10000x10 strip would otherwise need.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def to_array(img: Image.Image, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> ImageArray:
    """RGB image -> float32 (3, H, W), scaled to [0, 1] then normalised with mean/std."""
    a = np.asarray(to_rgb(img), dtype=np.float32) / 255  # (H, W, 3)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))  # (3, H, W)


def preprocess(img: Image.Image, size: int) -> ImageArray:
    """Eval path for our towers: centre crop, so the same image always gives the same embedding."""
    return Transform(size).preprocess(img)


def load_pixels(path: str | Path, size: int) -> ImageArray:
    """File -> our towers' input in one call: decode (JPEG drafted to `size`) and preprocess. Raises ImageError."""
    return Transform(size).load(path)


RESIZE_MODES = ("crop", "shortest_edge", "squash")


@dataclass(frozen=True)
class Transform:
    """How one model turns an image into its input: our towers' way (the defaults), or the way a pretrained
    checkpoint's image processor does it, so that it sees the inputs it was trained on.

    resize: `crop` is ours (the centred square, resampled once); `shortest_edge` is Hugging Face's CLIP
    processor (shorter side to `resize_to`, then the centred size x size); `squash` is SigLIP's (the whole
    image to size x size, aspect ratio not kept).
    """

    size: int  # side of the square model input
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    resize: str = "crop"
    resize_to: int = 0  # shortest_edge only: the shorter side before the centre crop
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        assert self.resize in RESIZE_MODES, self.resize

    def preprocess(self, img: Image.Image) -> ImageArray:
        """Eval path: the same image always gives the same input."""
        if self.resize == "crop":
            img = resize_center_crop(img, self.size)
        elif self.resize == "squash":
            img = to_rgb(img).resize((self.size, self.size), self.resample)
        else:  # as transformers' get_resize_output_image_size + center_crop compute it
            img = to_rgb(img)
            w, h = img.size
            short, long = min(w, h), max(w, h)
            new_long = int(self.resize_to * long / short)
            img = img.resize((self.resize_to, new_long) if w <= h else (new_long, self.resize_to), self.resample)
            left, top = (img.size[0] - self.size) // 2, (img.size[1] - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        return to_array(img, self.mean, self.std)

    def bank(self, img: Image.Image, side: int) -> Image.Image:
        """The small square a training bank keeps: squashed for a squashing model, else the centre."""
        return (
            img.resize((side, side), Image.Resampling.BICUBIC)
            if self.resize == "squash"
            else resize_center_crop(img, side)
        )

    @property
    def size_hint(self) -> int:
        """The side no image is decoded below (a JPEG drafted down to it): what this transform resizes to."""
        return max(self.size, self.resize_to)

    def load_image(self, path: str | Path) -> Image.Image:
        """Decode, a JPEG drafted down to no smaller than this transform resizes to. Raises ImageError."""
        return load_image(path, size_hint=self.size_hint)

    def decode(self, img: Image.Image) -> Image.Image:
        """A PIL image the way `load_image` decodes its file (see `decode`), so both give one vector."""
        return decode(img, self.size_hint)

    def load(self, path: str | Path) -> ImageArray:
        """File -> model input: decode and preprocess. Raises ImageError."""
        return self.preprocess(self.load_image(path))
