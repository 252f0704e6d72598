"""``blindspot invariances``: which input changes does a network ignore? (DESIGN.md §1.3)

Three commands:

* ``blindspot invariances --model M --out RUN_DIR [--data PATH] [--distance mse|ssim|vgg] [--alpha A] …`` —
  image-domain invariances by optimisation, for a CT denoiser (on its normalised low-dose input) or an MRI
  reconstruction network (on the true image, through the under-sampling physics).
* ``blindspot invariances train-generator --model M --out DIR …`` — train the conditional generator of natural
  invariances ``g(z|x)`` with its WGAN-GP critic on low-dose patches (checkpoints and ``--resume``).
* ``blindspot invariances sample --generator DIR --out RUN_DIR …`` — draw many natural invariances per image and
  report how far they move ``x``, how little they move ``f(x)`` and what the critic thinks of them.

``--model`` is a checkpoint file or a registered name (``gaussian-ri``; a name with bundled weights such as
``cnn10`` loads them). ``--data`` is a CT image file or folder (DICOM series, the LDCT layout, ``.npy``/``.png`` in
HU) for CT models, or an MRI source (fastMRI HDF5, images) for MRI models; without it, built-in phantoms are used.

A run folder holds ``run.json`` (settings; ``--resume`` must match them), ``records.jsonl`` (one line per image and
restart, appended after each batch; the durable log), ``records.csv``, ``summary.json``, ``arrays/<key>.npz``
(``x``, ``x_inv``, ``f_x``, ``f_x_inv``: HU for CT, normalised units for MRI), ``figures/<key>.png`` and
``section.html`` / ``report.html`` (the section the audit report includes).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from blindspot.errors import BlindspotError

MRI_ARCHITECTURES = ("unet", "irim", "zero-filled")
#: Settings that change the records of an image-domain run; a resumed run must match them.
_RUN_SETTINGS = (
    "model", "arch", "modality", "data", "phantoms", "size", "dose", "distance", "fidelity", "alpha", "iterations",
    "lr", "restarts", "init_std", "tol", "window", "min_iterations", "region", "bounds_hu", "mask_type",
    "acceleration", "center_fraction", "crop", "limit", "seed",
)  # fmt: skip
_SAMPLE_SETTINGS = ("generator", "model", "arch", "data", "phantoms", "size", "dose", "samples", "limit", "seed")


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", required=required,
                   help="checkpoint file, or a registered model name (gaussian-ri; cnn10, redcnn, wganvgg with "
                        "bundled weights; unet, irim, zero-filled for MRI)")
    p.add_argument("--arch", help="architecture of a bare state-dict checkpoint")
    p.add_argument("--modality", choices=["ct", "mri"],
                   help="default: the checkpoint's physics, else from the architecture")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="CT: DICOM series / LDCT folder / .npy or .png in HU; MRI: fastMRI HDF5 or images "
                                  "(default: built-in phantoms)")
    p.add_argument("--phantoms", type=_positive_int, default=4, help="number of built-in phantom slices (default 4)")
    p.add_argument("--size", type=_positive_int,
                   help="CT phantom size in pixels (default: the checkpoint's training size, else 512)")
    p.add_argument("--dose", type=float, help="CT phantoms: simulated dose of the network input "
                                              "(default: the checkpoint's, else 0.25)")
    p.add_argument("--mask-type", choices=["random", "equispaced"], help="MRI mask (default: checkpoint's, else random)")
    p.add_argument("--acceleration", type=float, help="MRI acceleration (default: checkpoint's first, else 4)")
    p.add_argument("--center-fraction", type=float, help="MRI centre fraction (default: standard for the acceleration)")
    p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="MRI image size (default: checkpoint's/data's)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N images")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per batch (default 4)")


def register(subparsers) -> None:
    from blindspot.attacks.distances import DISTANCES

    p = subparsers.add_parser(
        "invariances",
        help="invariances: large input changes a network ignores (optimised, or sampled from a generator)",
        description="Reconstruct invariances of a CT denoiser or MRI network: minimise ‖f(x) − f(x_inv)‖ − α·D(x, x_inv) "
                    "with Adam from x + noise. Sub-commands train and sample a generator of natural invariances.",
    )
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--distance", choices=DISTANCES, default="mse",
                   help="D: mse (bounded by 1, the seed's), ssim ((1 − SSIM)/2), vgg (VGG16 perceptual) or rms "
                        "(bounded un-squared norm) (default mse)")
    p.add_argument("--fidelity", choices=("same",) + DISTANCES, default="same",
                   help="‖·‖ on the outputs (default: the same as --distance, as the source document)")
    p.add_argument("--alpha", type=float, default=0.01, help="weight of the distance reward (default 0.01)")
    p.add_argument("--iterations", type=_positive_int, default=3000, help="most Adam iterations (default 3000)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    p.add_argument("--restarts", type=_positive_int, default=3, help="invariances per image (default 3)")
    p.add_argument("--init-std", type=float, default=0.1,
                   help="std of the start noise in normalised units (default 0.1: variance 10⁻²)")
    p.add_argument("--tol", type=float, default=1e-4, help="early stop: relative objective change per window")
    p.add_argument("--window", type=_positive_int, default=100, help="early stop: iterations per check (default 100)")
    p.add_argument("--min-iterations", type=int, default=300, help="no early stop before this (default 300)")
    p.add_argument("--region", help="where x may change: square:SIZE (central), box:TOP,LEFT,H,W, or a .npy mask")
    p.add_argument("--bounds-hu", default="-1024,3071",
                   help="CT: keep x_inv within LOW,HIGH HU ('none' for no bounds; default -1024,3071)")
    p.add_argument("--vgg-weights", help="torchvision-format VGG16 ImageNet weights (.pth) for --distance vgg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figures", type=int, default=8, help="figures for the first N images (default 8)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (required)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR, skipping images already recorded")
    p.set_defaults(func=run)

    inner = p.add_subparsers(dest="invariances_command", metavar="SUBCOMMAND")
    t = inner.add_parser(
        "train-generator",
        help="train a conditional generator of natural invariances g(z|x) with a WGAN-GP critic",
        description="Train g(z|x) to minimise ‖f(x) − f(g)‖ − α·D(x, g) − β·C(g) on low-dose patches, with a "
                    "WGAN-GP critic C. Writes DIR/generator.pt (checkpoint) and DIR/train_log.jsonl.",
    )
    _add_model_args(t, required=True)
    _add_data_args(t)
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--resume", action="store_true", help="continue from DIR/generator.pt")
    t.add_argument("--steps", type=_positive_int, default=2000, help="generator steps in total (default 2000)")
    t.add_argument("--alpha", type=float, default=0.01, help="weight of the distance reward (default 0.01)")
    t.add_argument("--beta", type=float, default=1e-3, help="weight of the critic term (default 0.001)")
    t.add_argument("--distance", choices=DISTANCES, default="rms",
                   help="D (default rms: the bounded un-squared norm, whose gradient does not vanish at g = x)")
    t.add_argument("--fidelity", choices=DISTANCES, default="mse")
    t.add_argument("--patch", type=_positive_int, default=80)
    t.add_argument("--train-batch", type=_positive_int, default=16, help="patches per step (default 16)")
    t.add_argument("--n-critic", type=_positive_int, default=5)
    t.add_argument("--gp-weight", type=float, default=10.0)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--scales", type=_positive_int, default=3)
    t.add_argument("--channels", type=_positive_int, default=32)
    t.add_argument("--z-channels", type=_positive_int, default=4)
    t.add_argument("--critic-channels", type=_positive_int, default=32)
    t.add_argument("--checkpoint-every", type=_positive_int, default=200)
    t.add_argument("--log-every", type=_positive_int, default=10)
    t.add_argument("--vgg-weights")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_train_generator)

    s = inner.add_parser(
        "sample",
        help="sample natural invariances from a trained generator and score them",
        description="Draw --samples invariances per image from g(z|x) (no optimisation); report the change of x, "
                    "the change of f(x) and the critic's scores against real low-dose patches.",
    )
    s.add_argument("--generator", required=True, help="generator checkpoint, or the folder holding generator.pt")
    _add_model_args(s)
    _add_data_args(s)
    s.add_argument("--samples", type=_positive_int, default=8, help="invariances per image (default 8)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--figures", type=int, default=8)
    s.add_argument("--out", required=True, metavar="RUN_DIR")
    s.add_argument("--resume", action="store_true")
    s.set_defaults(func=run_sample)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A network ready for an attack, with what is known about its physics and normalisation."""

    model: nn.Module
    name: str
    modality: str
    physics: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    architecture: str = ""
    source: str = ""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BlindspotError(None, f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BlindspotError(None, "--device cuda requested but no CUDA device is available")
    return dev


def _bundled_checkpoint(name: str) -> Path | None:
    """The package's bundled weights for a name: ``blindspot/weights/<name>.pt`` (e.g. ``cnn10``,
    ``mri_unet_robust``), else ``ct_<name>.pt`` / ``mri_<name>.pt`` (e.g. ``unet`` → ``mri_unet.pt``)."""
    import importlib.resources

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return None
    try:
        folder = Path(str(importlib.resources.files("blindspot") / "weights"))
    except (ModuleNotFoundError, TypeError):
        return None
    for candidate in (f"{name}.pt", f"ct_{name}.pt", f"mri_{name}.pt"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def load_model(spec: str, arch: str | None, device: torch.device, modality: str | None = None) -> LoadedModel:
    """Resolve ``--model``: a checkpoint file, a registered name with bundled weights, or a weight-free model."""
    from blindspot.models.checkpoint import load_checkpoint
    from blindspot.models.registry import build_model, model_names

    if not spec:
        raise BlindspotError(None, "--model is required")
    path = Path(spec)
    ck_path = path if path.is_file() else None
    if ck_path is None and path.exists():
        raise BlindspotError(path, "is a folder, not a checkpoint file")
    if ck_path is None:
        ck_path = _bundled_checkpoint(spec)
    if ck_path is not None:
        ck = load_checkpoint(ck_path, map_location=device, architecture=arch)
        mod = modality or (ck.physics or {}).get("modality") or ("mri" if ck.architecture in MRI_ARCHITECTURES else "ct")
        name = f"{ck.architecture}/{ck_path.stem}" if ck_path == path else f"{spec} (bundled)"
        return LoadedModel(ck.model.to(device).eval(), name, mod,
                           dict(ck.physics or {}), dict(ck.normalization or {}), ck.architecture, str(ck_path))
    if spec in model_names():
        model = build_model(spec).to(device).eval()
        if any(True for _ in model.parameters()):
            print(f"blindspot invariances: note: {spec!r} has no weights here (an untrained network)", file=sys.stderr)
        mod = modality or ("mri" if spec in MRI_ARCHITECTURES else "ct")
        return LoadedModel(model, spec, mod, {}, {}, spec, "registry")
    raise BlindspotError(spec, f"neither a checkpoint file nor a known model ({', '.join(model_names())})")


# ----------------------------------------------------------------------------------------------------------------
# CT data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CTItem:
    """One CT image to attack: identity and its low-dose image in HU ``(1, H, W)`` (loaded lazily)."""

    key: str
    load: Any  # () -> Tensor (1, H, W) HU
    weight: float = 1.0


def _phantom_items(n: int, size: int, dose: float, physics: dict[str, Any], seed: int) -> list[CTItem]:
    """Built-in phantom slices (alternating chest / abdomen, patient seeds ``seed·1000 + i``, mid-region slices)
    passed through the low-dose simulation at ``dose`` with a per-slice noise seed."""
    from blindspot.data.ct_phantom import FOV_MM, PhantomPatient
    from blindspot.physics.ct import LowDoseCT

    cache: dict[str, LowDoseCT] = {}

    def acquisition() -> LowDoseCT:
        if "ct" not in cache:
            if physics.get("modality") == "ct" and physics.get("pixel_size_mm") is not None:
                phys = dict(physics, pixel_size_mm=FOV_MM / size)
                cache["ct"] = LowDoseCT.from_physics_dict(phys, image_shape=(size, size))
            else:
                cache["ct"] = LowDoseCT((size, size), pixel_size_mm=FOV_MM / size)
        return cache["ct"]

    items = []
    for i in range(n):
        kind = ("chest", "abdomen")[i % 2]
        patient = seed * 1000 + i // 2
        z = 0.5 if kind == "abdomen" else 0.55

        def load(kind=kind, patient=patient, z=z, i=i) -> Tensor:
            hu = PhantomPatient(kind, patient).render(z, size=size).reshape(1, 1, size, size)
            g = torch.Generator().manual_seed(seed * 7919 + i)
            return acquisition().simulate(hu, (dose,), generator=g)[float(dose)][0]

        items.append(CTItem(f"phantom-{kind}-{patient}-z{z:.2f}-{size}px-dose{dose:g}", load))
    return items


def _file_items(path: Path, dose: float | None, dose_given: bool) -> list[CTItem]:
    """CT images of ``--data``: the LDCT layout (its low-dose images, patient-balanced weights), a folder of
    ``.npy`` images in HU, or one DICOM file / series (HU from the rescale tags)."""
    from blindspot.data import ldct

    if path.is_dir() and ldct._series_folders(path):
        try:
            patients = ldct.find_ldct(path, dose)
        except BlindspotError:
            if dose is None or dose_given:
                raise
            patients = ldct.find_ldct(path, None)  # the model's dose is not there: take the only low-dose series
        data = ldct.LDCTDataset(patients, preload=False)
        weights = data.patient_weights()
        return [CTItem(f"{s.patient}:{s.index}", (lambda i=i: torch.from_numpy(np.array(data.pair(i)[0])).unsqueeze(0)),
                       float(weights[i])) for i, s in enumerate(data.slices)]
    npy = [path] if path.suffix.lower() == ".npy" else (
        sorted(p for p in path.rglob("*.npy") if not any(t.startswith(".") for t in p.relative_to(path).parts))
        if path.is_dir() else [])
    if npy:
        return [CTItem(f.name if f == path else str(f.relative_to(path)), (lambda f=f: _read_npy_hu(f))) for f in npy]
    images = ldct.load_ct_images(path)
    return [CTItem(f"{path.name}:{name}", (lambda i=i: images.hu[i])) for i, name in enumerate(images.names)]


def _read_npy_hu(f: Path) -> Tensor:
    try:
        arr = np.load(f, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise BlindspotError(f, f"not a readable .npy file ({err})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise BlindspotError(f, f"expected a 2-D real image in HU, got {arr.dtype} of shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).unsqueeze(0)


def ct_items(args: argparse.Namespace, loaded: LoadedModel) -> tuple[list[CTItem], float | None]:
    """The CT images of ``--data`` (or phantoms) and the dose of the network input (``None`` when unknown)."""
    dose = args.dose if args.dose is not None else float(loaded.physics.get("dose", 0.25))
    if args.data is None:
        if not 0 < dose <= 1:
            raise BlindspotError(None, f"--dose must be in (0, 1], got {dose}")
        size = args.size or int((loaded.physics.get("image_shape") or [512])[0])
        items = _phantom_items(args.phantoms, size, dose, loaded.physics, args.seed)
    else:
        path = Path(args.data)
        if not path.exists():
            raise BlindspotError(path, "no such file or folder")
        want = args.dose if args.dose is not None else loaded.physics.get("dose")
        dose = None if want is None else float(want)
        items = _file_items(path, dose, args.dose is not None)
    if args.limit is not None:
        items = items[: args.limit]
    return items, dose


def _load_ct_batch(items: Sequence[CTItem]) -> Tensor:
    imgs = []
    for it in items:
        img = it.load()
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if not torch.isfinite(img).all():
            raise BlindspotError(it.key, "image contains NaN or Inf")
        imgs.append(img.to(torch.float32))
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) > 1:
        raise BlindspotError(items[0].key, f"images of one batch differ in size {sorted(shapes)}; use --batch-size 1")
    return torch.stack(imgs)


def ct_normalization(loaded: LoadedModel, sample_hu: Tensor | None) -> Any:
    """The model's HU ↔ network normalisation (checkpoint), else fitted to the given images (weight-free models such
    as ``gaussian-ri``: the CLI fits it to the first image, so a resumed run gets the same one)."""
    from blindspot.physics.ct import HUNormalization

    if loaded.normalization:
        return HUNormalization.from_dict(loaded.normalization, loaded.source)
    if sample_hu is None:
        raise BlindspotError(loaded.source, "has no CT normalization and no images to fit one to")
    return HUNormalization.fit(sample_hu)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:150] or "image"


def _settings(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    out = {}
    for k in names:
        v = getattr(args, k, None)
        out[k] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _check_run_dir(out: Path, command: str, settings: dict[str, Any], resume: bool) -> None:
    from blindspot.fileio import read_json, write_json

    run_json = out / "run.json"
    if (out / "records.jsonl").exists() and not resume:
        raise BlindspotError(out, "already holds invariance records; pass --resume to continue it or choose another --out")
    if run_json.exists() and resume:
        old = read_json(run_json)
        if old.get("command") != command:
            raise BlindspotError(run_json, f"the run folder belongs to {old.get('command')!r}, not {command!r}")
        diff = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        if diff:
            raise BlindspotError(run_json, f"the run was made with other settings ({', '.join(diff)}); "
                                           "resume with the same ones or choose another --out")
        return
    write_json(run_json, {"command": command, "settings": settings})


def _repair_log(path: Path) -> None:
    """Drop a partial last line left by a crash mid-append."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)


def _aggregate(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    from blindspot.metrics import mean_std

    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                and math.isfinite(float(r[k]))]
        if vals:
            m, s = mean_std(vals)
            out[k] = {"mean": m, "std": s, "n": len(vals)}
    return out


def _save_npz(path: Path, **arrays: Any) -> None:
    import io

    from blindspot.fileio import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
                                for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def parse_region(spec: str | None, height: int, width: int) -> Tensor | None:
    """``--region``: ``square:SIZE``, ``box:TOP,LEFT,H,W`` or a ``.npy`` mask → bool ``(H, W)`` (``None`` = all)."""
    from blindspot.attacks.invariance import box_mask, square_mask

    if spec is None:
        return None
    try:
        if spec.startswith("square:"):
            size = int(spec.split(":", 1)[1])
            if not 0 < size <= min(height, width):
                raise BlindspotError(None, f"--region {spec}: square must fit the {height}x{width} image")
            return square_mask(height, width, size)
        if spec.startswith("box:"):
            top, left, bh, bw = (int(v) for v in spec.split(":", 1)[1].split(","))
            return box_mask(height, width, top, left, bh, bw)
    except ValueError:
        raise BlindspotError(None, f"bad --region {spec!r}: use square:SIZE or box:TOP,LEFT,H,W") from None
    path = Path(spec)
    if not path.is_file():
        raise BlindspotError(path, "--region must be square:SIZE, box:TOP,LEFT,H,W or a .npy mask file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise BlindspotError(path, f"not a readable .npy mask ({err})") from None
    if arr.shape != (height, width) or not arr.any():
        raise BlindspotError(path, f"region mask must be a non-empty {height}x{width} array, got shape {arr.shape}")
    return torch.from_numpy(arr != 0)


def _bounds(spec: str | None, norm: Any) -> tuple[float, float] | None:
    if spec is None or spec.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in spec.split(","))
    except ValueError:
        raise BlindspotError(None, f"bad --bounds-hu {spec!r}: use LOW,HIGH in HU or none") from None
    if not lo < hi:
        raise BlindspotError(None, f"--bounds-hu {spec}: LOW must be below HIGH")
    return float(norm.to_network(torch.tensor(lo))), float(norm.to_network(torch.tensor(hi)))


def _batches(seq: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(seq), size):
        yield start, seq[start : start + size]


# ----------------------------------------------------------------------------------------------------------------
# Image-domain invariances
# ----------------------------------------------------------------------------------------------------------------
_METRIC_KEYS = ("mean_abs_change", "max_abs_change", "rms_change", "output_mean_abs_change", "output_rms_change",
                "change_ratio", "distance", "fidelity", "objective")


def run(args: argparse.Namespace) -> int:
    from blindspot.attacks.distances import build_distance
    from blindspot.attacks.invariance import InvarianceConfig

    if not args.out:
        raise BlindspotError(None, "--out RUN_DIR is required")
    out = Path(args.out)
    device = _device(args.device)
    loaded = load_model(args.model, args.arch, device, args.modality)
    config = InvarianceConfig(
        alpha=args.alpha, iterations=args.iterations, lr=args.lr, restarts=args.restarts, init_std=args.init_std,
        tol=args.tol, window=args.window, min_iterations=args.min_iterations, seed=args.seed,
    )
    distance = build_distance(args.distance, vgg_weights=args.vgg_weights, device=device)
    fidelity = None if args.fidelity in ("same", args.distance) else build_distance(
        args.fidelity, vgg_weights=args.vgg_weights, device=device)
    _check_run_dir(out, "invariances", _settings(args, _RUN_SETTINGS), args.resume)
    records = out / "records.jsonl"
    if args.resume:
        _repair_log(records)
    if loaded.modality == "ct":
        rows, summary = _run_ct(args, loaded, config, distance, fidelity, out)
    else:
        rows, summary = _run_mri(args, loaded, config, distance, fidelity, out)
    for d in (distance, fidelity):
        if getattr(d, "weights_info", None):
            summary["distance_weights"] = d.weights_info  # which VGG16 weights (ImageNet or not)
    _finish(out, rows, summary, args.figures)
    agg = summary["aggregate"]
    unit = summary["units"]
    print(f"invariances of {loaded.name} ({loaded.modality}, distance {args.distance}, alpha {args.alpha:g}): "
          f"{len(rows)} invariance(s) of {len({r['key'] for r in rows})} image(s)")
    for k in ("mean_abs_change", "output_mean_abs_change", "change_ratio", "distance", "fidelity",
              "null_mean_abs", "range_mean_abs", "square_ratio"):
        if k in agg:
            u = f" {unit}" if "abs_change" in k or k.endswith("_mean_abs") else ""
            print(f"  {k:24s} {agg[k]['mean']:.4g} ± {agg[k]['std']:.2g}{u}")
    print(f"records: {out / 'records.csv'}\nreport: {out / 'report.html'}")
    return 0


def _zoom_box(square: Any, height: int, width: int) -> tuple[int, int, int, int] | None:
    """A box three times a model's invariant square around the image centre, when the image is much larger."""
    if not isinstance(square, int) or square < 1 or 3 * square >= min(height, width):
        return None
    side = 3 * square
    return (height - side) // 2, (width - side) // 2, side, side


def _run_ct(args, loaded: LoadedModel, config, distance, fidelity, out: Path):
    from blindspot.attacks.invariance import DenoiserTarget, InvarianceAttack, square_contrast
    from blindspot.fileio import append_jsonl, read_jsonl, write_csv
    from blindspot.report.invariance_figures import ct_invariance_figure

    items, dose = ct_items(args, loaded)
    rows: list[dict[str, Any]] = read_jsonl(out / "records.jsonl") if args.resume else []
    done = {}
    for r in rows:
        done[r["key"]] = done.get(r["key"], 0) + 1
    norm = ct_normalization(loaded, None if loaded.normalization else _load_ct_batch(items[:1]))
    import dataclasses

    config = dataclasses.replace(config, bounds=_bounds(args.bounds_hu, norm))
    attack = InvarianceAttack(distance, fidelity, config)
    target = DenoiserTarget(loaded.model)
    square = getattr(loaded.model, "square", None)
    device = next((b.device for b in list(loaded.model.parameters()) + list(loaded.model.buffers())),
                  _device(args.device))
    figures_made = sum(1 for _ in (out / "figures").glob("*.png")) if (out / "figures").is_dir() else 0
    for start, chunk in _batches(items, args.batch_size):
        todo = [(start + j, it) for j, it in enumerate(chunk) if done.get(it.key, 0) < config.restarts]
        if not todo:
            continue
        hu = _load_ct_batch([it for _, it in todo]).to(device)
        x = norm.to_network(hu)
        region = parse_region(args.region, x.shape[-2], x.shape[-1])
        res = attack(target, x, region=region, item_ids=[i for i, _ in todo])
        m = res.metrics(scale=norm.std)
        contrast = square_contrast(res.delta[:, :, 0], square=int(square)) if isinstance(square, int) and \
            square <= min(x.shape[-2:]) else None
        new = []
        for b, (idx, it) in enumerate(todo):
            x_hu = norm.to_hu(res.x[b, 0])
            xi_hu = norm.to_hu(res.x_inv[b, :, 0])
            fx_hu = norm.to_hu(res.f_x[b, 0])
            fi_hu = norm.to_hu(res.f_x_inv[b, :, 0])
            name = _safe(it.key)
            _save_npz(out / "arrays" / f"{name}.npz", x=x_hu, x_inv=xi_hu, f_x=fx_hu, f_x_inv=fi_hu,
                      units="HU", normalization_mean=norm.mean, normalization_std=norm.std)
            if figures_made < args.figures:
                ct_invariance_figure(x_hu, xi_hu, fx_hu, fi_hu, out / "figures" / f"{name}.png",
                                     title=f"{loaded.name}: {it.key} (D = {args.distance}, α = {args.alpha:g})",
                                     zoom=_zoom_box(square, x.shape[-2], x.shape[-1]))
                figures_made += 1
            for r in range(res.x_inv.shape[1]):
                row = {"key": it.key, "index": idx, "restart": r, "model": loaded.name, "modality": "ct",
                       "distance_name": args.distance, "alpha": args.alpha, "units": "HU"}
                row.update({k: float(m[k][b, r]) for k in _METRIC_KEYS})
                row["iterations"] = int(res.iterations[b, r])
                row["converged"] = bool(res.converged[b, r])
                if contrast is not None:
                    row["square_inside"] = float(contrast["inside"][b, r]) * norm.std
                    row["square_outside"] = float(contrast["outside"][b, r]) * norm.std
                    row["square_ratio"] = float(contrast["ratio"][b, r])
                new.append(row)
        append_jsonl(out / "records.jsonl", new)
        rows.extend(new)
        write_csv(out / "records.csv", rows)
    summary = {
        "command": "invariances", "model": loaded.name, "architecture": loaded.architecture, "modality": "ct",
        "units": "HU", "dose": dose, "normalization": {"mean": norm.mean, "std": norm.std},
        "config": dict(config.to_dict(), distance=args.distance,
                       fidelity=args.distance if args.fidelity == "same" else args.fidelity),
    }
    return rows, summary


def _run_mri(args, loaded: LoadedModel, config, distance, fidelity, out: Path):
    from torch.utils.data import DataLoader, Subset

    from blindspot.attacks.invariance import InvarianceAttack, MRITarget, mri_decomposition, null_range_images
    from blindspot.data.mri import open_mri_dataset
    from blindspot.data.sample import collate_mri
    from blindspot.fileio import append_jsonl, read_jsonl, write_csv
    from blindspot.physics.mri import create_mask_func
    from blindspot.report.invariance_figures import mri_invariance_figure

    phys = loaded.physics
    mask_type = args.mask_type or phys.get("mask_type") or "random"
    acc = args.acceleration or float((phys.get("accelerations") or [4.0])[0])
    cf = [args.center_fraction] if args.center_fraction else None
    crop = tuple(args.crop) if args.crop else (tuple(phys["crop"]) if phys.get("crop") else None)
    mask_func = create_mask_func(mask_type, [acc], cf)
    dataset = open_mri_dataset(args.data, mask_func, crop=crop)
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate_mri, num_workers=0)
    attack = InvarianceAttack(distance, fidelity, config)
    rows: list[dict[str, Any]] = read_jsonl(out / "records.jsonl") if args.resume else []
    done: dict[str, int] = {}
    for r in rows:
        done[r["key"]] = done.get(r["key"], 0) + 1
    device = next((p.device for p in list(loaded.model.parameters()) + list(loaded.model.buffers())),
                  _device(args.device))
    figures_made = sum(1 for _ in (out / "figures").glob("*.png")) if (out / "figures").is_dir() else 0
    start = 0
    for batch in loader:
        keys = batch.keys
        sel = [j for j, k in enumerate(keys) if done.get(k, 0) < config.restarts]
        if sel:
            idx = torch.tensor(sel)
            truth = batch.target[idx].to(device)
            target = MRITarget(loaded.model, truth, batch.mask[idx].to(device))
            x = target.x
            region = parse_region(args.region, x.shape[-2], x.shape[-1])
            res = attack(target, x, region=region, item_ids=[start + j for j in sel])
            m = res.metrics()
            dec = mri_decomposition(target, res)
            null_abs, range_abs = null_range_images(target, res)
            new = []
            for b, j in enumerate(sel):
                name = _safe(keys[j])
                _save_npz(out / "arrays" / f"{name}.npz", x=res.x[b, 0], x_inv=res.x_inv[b, :, 0], f_x=res.f_x[b, 0],
                          f_x_inv=res.f_x_inv[b, :, 0], null_abs=null_abs[b, :, 0], range_abs=range_abs[b, :, 0],
                          mask=target.mask[b].reshape(-1).cpu(), units="normalised",
                          norm_mean=target.mean[b].reshape(()).cpu(), norm_std=target.std[b].reshape(()).cpu())
                if figures_made < args.figures:
                    mri_invariance_figure(res.x[b, 0], res.x_inv[b, 0, 0], res.f_x[b, 0], res.f_x_inv[b, 0, 0],
                                          null_abs[b, 0, 0], range_abs[b, 0, 0], out / "figures" / f"{name}.png",
                                          std=res.restart_std()[b, 0] if res.x_inv.shape[1] > 1 else None,
                                          title=f"{loaded.name}: {keys[j]} ({acc:g}x, D = {args.distance}, "
                                                f"α = {args.alpha:g})")
                    figures_made += 1
                for r in range(res.x_inv.shape[1]):
                    row = {"key": keys[j], "index": start + j, "restart": r, "model": loaded.name, "modality": "mri",
                           "acceleration": acc, "distance_name": args.distance, "alpha": args.alpha,
                           "units": "normalised"}
                    row.update({k: float(m[k][b, r]) for k in _METRIC_KEYS})
                    row.update({k: float(v[b, r]) for k, v in dec.items()})
                    row["iterations"] = int(res.iterations[b, r])
                    row["converged"] = bool(res.converged[b, r])
                    new.append(row)
            append_jsonl(out / "records.jsonl", new)
            rows.extend(new)
            write_csv(out / "records.csv", rows)
        start += len(keys)
    summary = {
        "command": "invariances", "model": loaded.name, "architecture": loaded.architecture, "modality": "mri",
        "units": "normalised", "mask_type": mask_type, "acceleration": acc,
        "config": dict(config.to_dict(), distance=args.distance,
                       fidelity=args.distance if args.fidelity == "same" else args.fidelity),
    }
    return rows, summary


def _finish(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], n_figures: int) -> None:
    from blindspot.fileio import write_csv, write_json
    from blindspot.report.invariance_figures import invariance_section_html, write_invariance_report

    keys = list(_METRIC_KEYS) + ["null_mean_abs", "range_mean_abs", "null_energy_fraction", "input_mean_abs_change",
                                 "square_inside", "square_outside", "square_ratio", "iterations", "critic_real",
                                 "critic_samples", "critic_noise", "critic_gap", "sample_std"]
    summary["aggregate"] = _aggregate(rows, keys)
    summary["images"] = len({r["key"] for r in rows})
    summary["rows"] = len(rows)
    if rows:
        summary["converged_fraction"] = sum(bool(r.get("converged")) for r in rows) / len(rows) \
            if "converged" in rows[0] else None
        write_csv(out / "records.csv", rows)
    write_json(out / "summary.json", summary)
    figs = sorted((out / "figures").glob("*.png"))[: max(n_figures, 0)] if (out / "figures").is_dir() else []
    title = "Natural invariances" if summary.get("command") == "invariances sample" else "Invariances"
    section = invariance_section_html(summary, rows, [(f.stem, f) for f in figs], title=title)
    write_invariance_report(out, section, title=f"blindspot {title.lower()}: {summary.get('model', '')}")


# ----------------------------------------------------------------------------------------------------------------
# Natural invariances: training and sampling
# ----------------------------------------------------------------------------------------------------------------
def _ct_only(loaded: LoadedModel, what: str) -> None:
    if loaded.modality != "ct":
        raise BlindspotError(loaded.source or None, f"{what} is implemented for CT denoisers; "
                                                    f"{loaded.name!r} is an {loaded.modality.upper()} model")


def run_train_generator(args: argparse.Namespace) -> int:
    from blindspot.attacks.natural import NaturalConfig, NaturalInvarianceTrainer

    device = _device(args.device)
    loaded = load_model(args.model, args.arch, device, args.modality)
    _ct_only(loaded, "natural-invariance training")
    out = Path(args.out)
    ckpt = out / "generator.pt"
    if ckpt.exists() and not args.resume:
        raise BlindspotError(ckpt, "already exists; pass --resume to continue training or choose another --out")
    if args.resume and not ckpt.exists():
        raise BlindspotError(ckpt, "nothing to resume: no generator checkpoint here")
    items, dose = ct_items(args, loaded)
    hu = _load_ct_batch(items)
    norm = ct_normalization(loaded, hu if not loaded.normalization else None)
    images = norm.to_network(hu).to(device)
    weights = torch.tensor([it.weight for it in items], dtype=torch.float32)
    config = NaturalConfig(
        alpha=args.alpha, beta=args.beta, distance=args.distance, fidelity=args.fidelity, patch=args.patch,
        batch_size=args.train_batch, n_critic=args.n_critic, gp_weight=args.gp_weight, lr=args.lr, scales=args.scales,
        channels=args.channels, z_channels=args.z_channels, critic_channels=args.critic_channels, seed=args.seed,
    )
    target_info = {"model": args.model, "arch": args.arch, "name": loaded.name, "modality": "ct",
                   "normalization": {"kind": "hu-affine", "mean": norm.mean, "std": norm.std, "units": "HU"},
                   "dose": dose, "data": args.data or f"phantoms:{args.phantoms}",
                   "images": len(items)}
    trainer = NaturalInvarianceTrainer(loaded.model, images, config, checkpoint=ckpt, target_info=target_info,
                                       weights=weights if bool((weights != weights[0]).any()) else None,
                                       vgg_weights=args.vgg_weights)
    if trainer.step >= args.steps:
        print(f"generator already trained for {trainer.step} steps (--steps {args.steps}); nothing to do")
        return 0
    if trainer.step:
        print(f"resuming from step {trainer.step}")
    logged = trainer.train(args.steps, checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    if logged:
        last = logged[-1]
        print(f"step {last['step']}: fidelity {last['fidelity']:.4g}, distance {last['distance']:.4g}, "
              f"critic Wasserstein estimate {last['wasserstein']:.4g}")
    print(f"generator: {ckpt}\nlog: {out / 'train_log.jsonl'}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from blindspot.attacks.natural import evaluate_samples, load_generator, sample_invariances
    from blindspot.fileio import append_jsonl, read_jsonl, write_csv
    from blindspot.physics.ct import HUNormalization
    from blindspot.report.invariance_figures import natural_samples_figure

    device = _device(args.device)
    gpath = Path(args.generator)
    if gpath.is_dir():
        gpath = gpath / "generator.pt"
    gen, critic, meta = load_generator(gpath, map_location=device)
    tinfo = meta["target"]
    spec = args.model or tinfo.get("model")
    loaded = load_model(spec, args.arch or tinfo.get("arch"), device, args.modality)
    _ct_only(loaded, "natural-invariance sampling")
    if not loaded.normalization and tinfo.get("normalization"):
        loaded.normalization = dict(tinfo["normalization"])
    if args.dose is None and tinfo.get("dose") is not None and args.data is None:
        args.dose = float(tinfo["dose"])
    out = Path(args.out)
    _check_run_dir(out, "invariances sample", _settings(args, _SAMPLE_SETTINGS), args.resume)
    if args.resume:
        _repair_log(out / "records.jsonl")
    items, dose = ct_items(args, loaded)
    norm = ct_normalization(loaded, _load_ct_batch(items[:1]) if not loaded.normalization else None)
    assert isinstance(norm, HUNormalization)
    patch = int(meta["config"].get("patch", 80))
    rows: list[dict[str, Any]] = read_jsonl(out / "records.jsonl") if args.resume else []
    done = {r["key"] for r in rows}
    figures_made = sum(1 for _ in (out / "figures").glob("*.png")) if (out / "figures").is_dir() else 0
    loaded.model.eval()
    for start, chunk in _batches(items, args.batch_size):
        todo = [(start + j, it) for j, it in enumerate(chunk) if it.key not in done]
        if not todo:
            continue
        x = norm.to_network(_load_ct_batch([it for _, it in todo]).to(device))
        samples = sample_invariances(gen, x, args.samples, seed=[args.seed * 1_000_003 + i for i, _ in todo])
        m = evaluate_samples(loaded.model, x, samples, critic, patch=patch, scale=norm.std, seed=args.seed)
        with torch.no_grad():
            f_x = loaded.model(x)
        new = []
        for b, (idx, it) in enumerate(todo):
            with torch.no_grad():
                f_s = loaded.model(samples[b])
            name = _safe(it.key)
            x_hu, s_hu = norm.to_hu(x[b, 0]).cpu(), norm.to_hu(samples[b, :, 0]).cpu()
            fx_hu, fs_hu = norm.to_hu(f_x[b, 0]).cpu(), norm.to_hu(f_s[:, 0]).cpu()
            _save_npz(out / "arrays" / f"{name}.npz", x=x_hu, samples=s_hu, f_x=fx_hu, f_samples=fs_hu, units="HU")
            if figures_made < args.figures:
                natural_samples_figure(x_hu, s_hu, fx_hu, fs_hu, out / "figures" / f"{name}.png",
                                       title=f"{loaded.name}: natural invariances of {it.key}")
                figures_made += 1
            row = {"key": it.key, "index": idx, "model": loaded.name, "samples": args.samples, "units": "HU"}
            row.update({k: float(v[b]) for k, v in m.items()})
            new.append(row)
        append_jsonl(out / "records.jsonl", new)
        rows.extend(new)
        write_csv(out / "records.csv", rows)
    summary = {"command": "invariances sample", "model": loaded.name, "modality": "ct", "units": "HU",
               "generator": str(gpath), "generator_step": meta["step"], "generator_config": meta["config"],
               "dose": dose, "config": {"samples": args.samples, "seed": args.seed, "distance": "generator"}}
    _finish(out, rows, summary, args.figures)
    agg = summary["aggregate"]
    print(f"natural invariances of {loaded.name}: {len(rows)} image(s) × {args.samples} samples")
    for k in ("mean_abs_change", "output_mean_abs_change", "change_ratio", "sample_std", "critic_real",
              "critic_samples", "critic_noise"):
        if k in agg:
            print(f"  {k:24s} {agg[k]['mean']:.4g} ± {agg[k]['std']:.2g}")
    print(f"records: {out / 'records.csv'}\nreport: {out / 'report.html'}")
    return 0
