"""Plain images (DICOM, PNG, NumPy) as MRI ground truths, with simulated k-space, as :class:`MRISample`.

Each image ``y`` is taken as a *magnitude* ground truth; its k-space is simulated as ``F(y)`` (the centred
orthonormal DFT, :func:`blindspot.physics.mri.fft2c`), exactly as the FNAF attack treats its images, and then goes
through :class:`~blindspot.data.sample.KspaceTransform` (mask seeded by the file's name) like fastMRI data.

What counts as one image:

* ``.png``: one image. Greyscale (8/16-bit, float) as stored; RGB(A)/palette → luminance
  ``0.299 R + 0.587 G + 0.114 B``; alpha is dropped.
* ``.npy``: a 2-D array ``(H, W)`` is one image; a 3-D array ``(N, H, W)`` is a volume of ``N`` slices that share
  the file's name (and therefore one mask, as a fastMRI volume). Real, integer, boolean or complex arrays
  (complex → magnitude ``|y|``). Arrays are memory-mapped: a large volume is not read whole.
* DICOM (``.dcm``, ``.dicom``, ``.ima``, or any file with the ``DICM`` marker): one single-frame image, read by
  :func:`blindspot.data.dicom.read_dicom` (any supported compression; modality rescale applied; colour →
  luminance). ``MONOCHROME1`` images are inverted (``min + max − value``) so that high signal is bright.

Values: converted to float32. NaN or Inf is an error; **negative values are an error** (a magnitude image cannot be
negative — take ``abs`` or shift the data first; we do not guess which); an all-zero image is an error (it has no
contrast to normalise).

Sizes (``size = (h, w)``, the working size of k-space, input and target; ``None`` keeps each image's own size):

* ``resize="crop"`` (default): each axis larger than the working size is centre-cropped (offset
  ``(H − h) // 2``, fastMRI's rule), each smaller axis is zero-padded evenly (``(h − H) // 2`` zeros before). Pixel
  values and pixel size are untouched.
* ``resize="resample"``: the image is scaled by ``s = min(h/H, w/W)`` with scikit-image (bilinear, anti-aliased when
  shrinking) so that the whole image fits without distortion, then zero-padded to ``(h, w)`` as above.

``fname`` (mask seed and sample identity) is the file name, or the path relative to the folder for files in
sub-folders. ``max_value`` is the image's maximum (a 3-D ``.npy`` volume's maximum for its slices).

Every file is opened and validated when the dataset is built; pixel problems (NaN, negative values) are raised when
the image is read. Errors are :class:`~blindspot.errors.BlindspotError` naming the file (and slice). Nothing is
skipped silently except hidden files and ``DICOMDIR`` index files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from blindspot.data.dicom import INDEX_FILE_NAMES, check_pixel_data, is_dicom_file, open_dicom, read_dicom
from blindspot.data.sample import MAX_SLICE_ELEMENTS, KspaceTransform, MRISample
from blindspot.errors import BlindspotError, PathLike
from blindspot.physics.mri import MaskFunc, fft2c
from blindspot.validate import MIN_IMAGE_SIDE

PNG_SUFFIXES = (".png",)
NUMPY_SUFFIXES = (".npy",)
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
RESIZE_MODES = ("crop", "resample")


def image_kind(path: Path) -> str | None:
    """``"png"``, ``"npy"``, ``"dicom"`` or ``None`` (not an image file blindspot reads)."""
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        return "png"
    if suffix in NUMPY_SUFFIXES:
        return "npy"
    if suffix in DICOM_SUFFIXES or is_dicom_file(path):
        return "dicom"
    return None


def find_image_files(root: PathLike) -> list[tuple[Path, str, str]]:
    """``(path, fname, kind)`` of the image files under ``root`` (a file, or a folder searched recursively), sorted.

    Hidden files and ``DICOMDIR`` are ignored; any other file that is not an image is an error.
    """
    root = Path(root)
    if not root.exists():
        raise BlindspotError(root, "no such file or folder")
    if root.is_file():
        kind = image_kind(root)
        if kind is None:
            raise BlindspotError(root, "not a DICOM, PNG (.png) or NumPy (.npy) file")
        return [(root, root.name, kind)]
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.name in INDEX_FILE_NAMES:
            continue
        kind = image_kind(p)
        if kind is None:
            raise BlindspotError(p, "not a DICOM, PNG (.png) or NumPy (.npy) file; an image folder must hold only images")
        found.append((p, rel.as_posix(), kind))
    if not found:
        raise BlindspotError(root, "empty folder: no DICOM, PNG or NumPy files")
    return found


# ------------------------------------------------------------------------------------------------------------------
# Reading each kind
# ------------------------------------------------------------------------------------------------------------------
def _open_png(path: Path):
    """Open (not decode) a PNG; its declared size is checked against :data:`MAX_SLICE_ELEMENTS` before any pixel
    is decoded (a decompression bomb — a tiny file declaring a huge image — is a one-line error)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            _check_png_size(path, img.size)
            img.verify()  # checks the chunks and their CRCs without decoding
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BlindspotError(path, f"declares an image too large to decode safely (decompression bomb: {err})") from None
    except UnidentifiedImageError:
        raise BlindspotError(path, "not a PNG image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BlindspotError(path, f"corrupt or truncated PNG ({err})") from None
    if img.format != "PNG":
        raise BlindspotError(path, f"is a {img.format} image, not PNG")
    return img


def _check_png_size(path: Path, size: tuple[int, int]) -> None:
    w, h = int(size[0]), int(size[1])
    if w * h > MAX_SLICE_ELEMENTS:
        raise BlindspotError(path, f"declares a {w}x{h} image ({w * h:.3g} pixels), beyond the limit of "
                             f"{MAX_SLICE_ELEMENTS:.3g}: refused before decoding (a decompression bomb?)")


def read_mask(path: PathLike, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """A boolean region mask from a ``.npy`` file: nonzero = inside; bool ``(h, w)``. It must be a non-empty 2-D
    array (of ``shape`` when given); anything else is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BlindspotError(path, "no such mask file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise BlindspotError(path, f"not a readable .npy mask ({err})") from None
    if arr.ndim != 2 or not arr.any() or (shape is not None and tuple(arr.shape) != tuple(shape)):
        want = f"{shape[0]}x{shape[1]}" if shape is not None else "2-D"
        raise BlindspotError(path, f"region mask must be a non-empty {want} array, got shape {arr.shape}")
    return torch.from_numpy(arr != 0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _read_png(path: Path) -> np.ndarray:
    img = _open_png(path)
    try:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        array = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise BlindspotError(path, f"corrupt or truncated PNG ({err})") from None
    if array.ndim == 3:
        array = array[..., 0] if array.shape[-1] <= 2 else _luminance(array[..., :3])
    return array


def _open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        text = str(err)
        if "mmap length" in text or "cannot mmap" in text or "EOF" in text or "size" in text.lower():
            raise BlindspotError(path, f"truncated or corrupt .npy file ({text})") from None
        raise BlindspotError(path, f"not a readable NumPy .npy array ({text})") from None
    if not isinstance(array, np.ndarray):
        raise BlindspotError(path, "not a NumPy .npy array")
    if array.dtype.kind not in "biufc":
        raise BlindspotError(path, f"array dtype {array.dtype} is not numeric")
    if array.ndim not in (2, 3) or min(array.shape) < 1:
        raise BlindspotError(path, f"array has shape {tuple(array.shape)}; expected (H, W) or (slices, H, W)")
    if int(array.shape[-1]) * int(array.shape[-2]) > MAX_SLICE_ELEMENTS:
        raise BlindspotError(path, f"declares slices of {array.shape[-2]}x{array.shape[-1]}, beyond the limit of "
                             f"{MAX_SLICE_ELEMENTS:.3g} pixels")
    return array


def _to_magnitude(array: np.ndarray) -> np.ndarray:
    if np.iscomplexobj(array):
        return np.abs(array).astype(np.float32)
    return np.asarray(array, dtype=np.float32)


def fit_to_size(image: np.ndarray, size: tuple[int, int], resize: str = "crop") -> np.ndarray:
    """Bring a real image ``(..., H, W)`` to ``size = (h, w)`` by the module's rule (``"crop"`` or ``"resample"``).

    Returns float32 ``(..., h, w)``.
    """
    h, w = int(size[0]), int(size[1])
    if resize == "resample":
        from skimage.transform import resize as sk_resize

        H, W = image.shape[-2:]
        scale = min(h / H, w / W)
        new = (max(1, min(h, round(H * scale))), max(1, min(w, round(W * scale))))
        if new != (H, W):
            out_shape = image.shape[:-2] + new
            image = sk_resize(
                image.astype(np.float64), out_shape, order=1, mode="edge", preserve_range=True, anti_aliasing=scale < 1
            )
            image = np.clip(image, 0.0, None)
    elif resize != "crop":
        raise BlindspotError(None, f"unknown resize mode {resize!r}; choose from {list(RESIZE_MODES)}")
    H, W = image.shape[-2:]
    if H > h:
        top = (H - h) // 2
        image = image[..., top : top + h, :]
    if W > w:
        left = (W - w) // 2
        image = image[..., :, left : left + w]
    H, W = image.shape[-2:]
    if (H, W) != (h, w):
        pad = [(0, 0)] * (image.ndim - 2) + [((h - H) // 2, h - H - (h - H) // 2), ((w - W) // 2, w - W - (w - W) // 2)]
        image = np.pad(image, pad)
    return np.ascontiguousarray(image, dtype=np.float32)


@dataclass(frozen=True)
class ImageEntry:
    """A validated image file. ``shape`` is ``(slices, H, W)`` of its pixels as stored."""

    path: Path
    fname: str
    kind: str
    shape: tuple[int, int, int]


def _check_values(image: np.ndarray, path: Path, where: str) -> None:
    finite = np.isfinite(image)
    if not finite.all():
        nan = int(np.isnan(image).sum())
        inf = int(image.size - finite.sum()) - nan
        parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
        raise BlindspotError(path, f"{where}contains {' and '.join(p for p in parts if p)} values")
    low = float(image.min())
    if low < 0:
        raise BlindspotError(
            path, f"{where}has negative values (min {low:g}); a magnitude image must be >= 0 (take abs or shift it first)"
        )
    if float(image.max()) == 0.0:
        raise BlindspotError(path, f"{where}is blank (every pixel is zero)")
    if float(image.max()) == low:
        raise BlindspotError(path, f"{where}is constant (every pixel is {low:g}): no structure to reconstruct, and "
                             "SSIM against it would read 1.0")


def _inspect_file(path: Path, fname: str, kind: str) -> ImageEntry:
    if kind == "png":
        img = _open_png(path)
        shape = (1, img.size[1], img.size[0])
    elif kind == "npy":
        array = _open_npy(path)
        shape = (1, *array.shape) if array.ndim == 2 else tuple(array.shape)
    else:
        ds = open_dicom(path)
        check_pixel_data(ds, path, single_frame=True)
        shape = (1, int(ds.Rows), int(ds.Columns))
    if min(shape[1:]) < MIN_IMAGE_SIDE:
        raise BlindspotError(path, f"image of {shape[1]}x{shape[2]} pixels is smaller than the {MIN_IMAGE_SIDE}x"
                             f"{MIN_IMAGE_SIDE} minimum (it would be padded into a meaningless input)")
    return ImageEntry(path, fname, kind, tuple(int(s) for s in shape))


class ImageDataset(Dataset):
    """DICOM, PNG and NumPy images as MRI ground truths with k-space ``F(y)`` (see the module docs for every rule).

    Args:
        path: an image file or a folder of them (searched recursively).
        size: working ``(h, w)`` of k-space, input and target; ``None`` keeps each image's own size.
        mask_func: under-sampling mask function; ``None`` → fully sampled.
        resize: ``"crop"`` (centre crop / zero pad) or ``"resample"`` (scale to fit, then pad).
        use_seed: seed each image's mask with its ``fname``.
        progress: tqdm bar while validating files (``None``: only on a terminal).

    Items are :class:`MRISample` with ``input``/``target`` ``(1, h, w)`` float32 in the image's own units.
    """

    def __init__(
        self,
        path: PathLike,
        size: tuple[int, int] | None = (320, 320),
        mask_func: MaskFunc | None = None,
        resize: str = "crop",
        use_seed: bool = True,
        progress: bool | None = None,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise BlindspotError(None, f"unknown resize mode {resize!r}; choose from {list(RESIZE_MODES)}")
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < MIN_IMAGE_SIDE:
                raise BlindspotError(None, f"image size {size[0]}x{size[1]} is smaller than the {MIN_IMAGE_SIDE}x"
                                     f"{MIN_IMAGE_SIDE} minimum")
        self.root = Path(path)
        self.size = size
        self.resize = resize
        self.mask_func = mask_func
        self.use_seed = use_seed
        files = find_image_files(self.root)
        disable = None if progress is None else not progress
        self.entries: list[ImageEntry] = [
            _inspect_file(p, fname, kind) for p, fname, kind in tqdm(files, desc="checking images", unit="file", disable=disable)
        ]
        self.samples: list[tuple[int, int]] = [(e, s) for e, entry in enumerate(self.entries) for s in range(entry.shape[0])]
        self._volume_max: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _raw(self, entry: ImageEntry, s: int) -> tuple[np.ndarray, dict[str, Any]]:
        info: dict[str, Any] = {"kind": entry.kind, "path": str(entry.path)}
        if entry.kind == "png":
            return _read_png(entry.path), info
        if entry.kind == "npy":
            array = _open_npy(entry.path)
            try:
                return np.array(array if array.ndim == 2 else array[s]), info
            except (ValueError, OSError) as err:
                raise BlindspotError(entry.path, f"cannot read slice {s} ({err})") from None
        image = read_dicom(entry.path)
        pixels = image.pixels
        if image.photometric == "MONOCHROME1":
            pixels = pixels.min() + pixels.max() - pixels
        info.update(
            modality=image.modality, transfer_syntax=str(image.transfer_syntax), rescaled=image.rescaled,
            photometric=image.photometric,
        )
        return pixels, info

    def read_image(self, index: int) -> tuple[ImageEntry, int, np.ndarray, dict[str, Any]]:
        """Item ``index`` as ``(entry, slice_num, y, info)``: ``y`` float32 ``(h, w)`` magnitude after the size rule.

        Raises:
            BlindspotError: naming the file (and slice) — unreadable, NaN/Inf, negative, blank.
        """
        e, s = self.samples[index]
        entry = self.entries[e]
        raw, info = self._raw(entry, s)
        image = _to_magnitude(raw)
        if image.shape != entry.shape[1:]:
            raise BlindspotError(entry.path, f"image is {image.shape}, but was {entry.shape[1:]} when first opened")
        _check_values(image, entry.path, f"slice {s}: " if entry.shape[0] > 1 else "")
        if self.size is not None:
            image = fit_to_size(image, self.size, self.resize)
        info["original_shape"] = tuple(entry.shape[1:])
        return entry, s, image, info

    def _max_value(self, e: int, image: np.ndarray) -> float:
        entry = self.entries[e]
        if entry.shape[0] == 1:
            return float(image.max())
        if e not in self._volume_max:  # a 3-D .npy volume: its maximum, in the working size
            volume = _to_magnitude(np.asarray(_open_npy(entry.path)))
            if self.size is not None:
                volume = fit_to_size(volume, self.size, self.resize)
            self._volume_max[e] = float(np.nanmax(volume))
        return self._volume_max[e]

    def __getitem__(self, index: int) -> MRISample:
        entry, s, image, info = self.read_image(index)
        y = torch.from_numpy(image)  # (h, w) float32 magnitude
        kspace = fft2c(y)  # (h, w) complex64
        transform = KspaceTransform(self.mask_func, crop=tuple(image.shape), use_seed=self.use_seed)
        return transform(kspace, y, entry.fname, s, max_value=self._max_value(self.samples[index][0], image), attrs=info)

    def check(self, progress: bool | None = None) -> int:
        """Read every image and raise on the first bad one; returns the number read."""
        disable = None if progress is None else not progress
        for i in tqdm(range(len(self)), desc="reading images", unit="image", disable=disable):
            self.read_image(i)
        return len(self)

    def summary(self) -> dict[str, Any]:
        """Counts of files, slices, kinds and stored sizes, as plain JSON-able values."""

        def counts(values) -> dict[str, int]:
            out: dict[str, int] = {}
            for value in values:
                out[str(value)] = out.get(str(value), 0) + 1
            return dict(sorted(out.items()))

        return {
            "kind": "images",
            "root": str(self.root),
            "files": len(self.entries),
            "slices": len(self.samples),
            "file_kinds": counts(e.kind for e in self.entries),
            "stored_shape": counts(f"{e.shape[1]}x{e.shape[2]}" for e in self.entries),
            "working_size": None if self.size is None else f"{self.size[0]}x{self.size[1]}",
            "resize": self.resize,
        }
