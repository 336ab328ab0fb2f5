"""Image loading and transforms: file -> RGB PIL image -> normalised float32 (3, H, W).

Numpy and Pillow only, so indexing and serving never pay for a torch import here.
Every unreadable file becomes one `ImageError` that names it and says what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageError

ImageArray = npt.NDArray[np.float32]  # (3, H, W), normalised with MEAN/STD

# CLIP's statistics, so pretrained towers see the inputs they were trained on.
MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# Same as Pillow's default bomb limit, but checked by us so callers can raise it per call.
DEFAULT_MAX_PIXELS = 89_478_485

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(
    path: str | Path, size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open and fully decode an image as RGB with EXIF orientation applied.

    Decoding everything here means a corrupt or truncated file fails now, with its
    name, rather than as a bare PIL error deep inside a training or indexing batch.
    `size_hint` lets JPEG decode at a reduced scale that stays >= size_hint per side.
    """
    try:
        with open(path, "rb") as f:
            with warnings.catch_warnings():
                # Our own max_pixels check below replaces Pillow's global warning.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
            _check_pixels(path, img.size, max_pixels)  # header only: nothing decoded yet
            if size_hint is not None and img.format == "JPEG":
                img.draft("RGB", (size_hint, size_hint))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageError(f"cannot read image {path}: {_describe(e)}") from e


def _check_pixels(path: str | Path, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse huge images before decoding, since decoding one can exhaust memory."""
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"cannot read image {path}: it is {w} x {h} = {w * h / 1e6:.3g} megapixels, "
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
    rescaled, since Pillow's own convert clips them to garbage.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _UINT16_MODES:
        return _gray_to_rgb(np.asarray(img).astype(np.float64) * (255 / 65535))
    if img.mode in ("I", "F"):
        return _gray_to_rgb(_rescale_to_255(np.asarray(img, dtype=np.float64), img.mode == "F"))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # P, CMYK, 1, L, YCbCr, LAB, HSV


def _rescale_to_255(a: npt.NDArray[np.float64], is_float: bool) -> npt.NDArray[np.float64]:
    """Map the data onto 0-255 by the smallest usual range that holds it.

    Floats in 0-1 and integers in 0-255 or 0-65535 keep their absolute brightness;
    anything else (negatives, HDR, 32-bit counts) is stretched from its min to its max.
    """
    a = np.nan_to_num(a)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0:
        ranges = ((1.0,) if is_float else ()) + (255.0, 65535.0)
        for top in ranges:
            if hi <= top:
                return a * (255 / top)
    return (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)


def _gray_to_rgb(a: npt.NDArray[np.float64]) -> Image.Image:
    """Round a 0-255 grey array to uint8 and repeat it into three channels."""
    gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (bicubic) and keep the centred square.

    Cropping the square in source coordinates and resizing once is the same result,
    but never builds the huge intermediate a 10000x10 strip would otherwise need.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )


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
        return img.resize((side, side), Image.Resampling.BICUBIC) if self.resize == "squash" else resize_center_crop(img, side)

    def load_image(self, path: str | Path) -> Image.Image:
        """Decode, a JPEG drafted down to no smaller than this transform resizes to. Raises ImageError."""
        return load_image(path, size_hint=max(self.size, self.resize_to))

    def load(self, path: str | Path) -> ImageArray:
        """File -> model input: decode and preprocess. Raises ImageError."""
        return self.preprocess(self.load_image(path))
