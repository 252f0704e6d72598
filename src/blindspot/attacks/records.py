"""Per-image FNAF records, their aggregation (the seed's Table 2 and IP table), and saved features for transfer.

* :class:`FnafResult` — what a search returns for a batch: the best feature of every image with its scores.
  :meth:`FnafResult.rows` flattens it into one plain dict per image (the columns of ``records.csv``).
* :func:`summarize` — attack rate with its 95% Wilson interval, mean attack loss, mean recovery, IP acceptance and
  mean IP loss over a list of rows; :func:`table2` and :func:`ip_table` lay summaries out as in the seed.
* :func:`save_features` / :func:`load_features` — found features (parameters and rendered images) as ``.pt`` files
  readable with ``torch.load(..., weights_only=True)`` plus a JSON twin, to replay against another model;
  :func:`transfer_rate` scores the replay.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from blindspot.attacks.features import Features
from blindspot.attacks.fnaf import Evaluation
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes, write_json
from blindspot.metrics import wilson_interval

FEATURES_FORMAT = "blindspot-fnaf-features"
FEATURES_VERSION = 1

#: Columns of ``records.csv``, in order.
RECORD_COLUMNS: tuple[str, ...] = (
    "key", "fname", "slice", "modality", "acceleration", "model", "search", "family", "criterion",
    "row", "col", "size0", "size1", "angle", "intensity", "shape_seed", "pixels", "feature_max",
    "attack_loss", "baseline_loss", "loss_threshold", "recovery", "ip_loss", "ip_threshold", "accepted", "success_seed", "success_recovery", "success",
    "queries", "gradients",
)  # fmt: skip


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def _float(v: Any) -> float:
    if v is None or v == "":
        return float("nan")
    return float(v)


@dataclass
class FnafResult:
    """The outcome of one search over a batch of ``B`` images.

    Attributes:
        search: the search's name (``rs``, ``fd``, ``grad``, ``replay``…).
        criterion: the objective's criterion (``seed`` / ``recovery``); ``success`` follows it.
        keys, fname, slice_num: per-image identities.
        acceleration: float32 ``(B,)`` (host).
        features: the best feature's parameters (length ``B``).
        feature: the best ``δ'`` as rendered or optimised, float32 ``(B, 1, h, w)`` in the image's units.
        support: its support ``S``, bool ``(B, 1, h, w)``.
        evaluation: its scores (each ``(B,)``).
        queries: int64 ``(B,)`` model forward passes spent on the image (including the clean reference).
        gradients: int64 ``(B,)`` backward passes spent on the image.
        loss_threshold: the ``L_atk`` threshold the seed criterion used at this image size.
        ip_threshold: the IP threshold in force (the acquisition's unless the objective set one).
        modality: the acquisition's modality (``mri`` / ``ct``); for CT, ``acceleration`` is ``1/dose``.
    """

    search: str
    criterion: str
    keys: list[str]
    fname: list[str]
    slice_num: list[int]
    acceleration: Tensor
    features: Features
    feature: Tensor
    support: Tensor
    evaluation: Evaluation
    queries: Tensor
    gradients: Tensor
    loss_threshold: float = float("nan")
    ip_threshold: float = float("nan")
    modality: str = "mri"

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def success(self) -> Tensor:
        ev = self.evaluation
        return ev.success_seed if self.criterion == "seed" else ev.success_recovery

    def cpu(self) -> "FnafResult":
        ev = self.evaluation
        return FnafResult(
            self.search,
            self.criterion,
            list(self.keys),
            list(self.fname),
            list(self.slice_num),
            self.acceleration.cpu(),
            self.features.detach().to("cpu"),
            self.feature.detach().cpu(),
            self.support.detach().cpu(),
            ev.map(lambda t: t.detach().cpu()),
            self.queries.cpu(),
            self.gradients.cpu(),
            self.loss_threshold,
            self.ip_threshold,
            self.modality,
        )

    def rows(self, model: str = "") -> list[dict[str, Any]]:
        """One plain dict per image with the :data:`RECORD_COLUMNS` (host values, one device sync per column)."""
        r = self.cpu()
        ev, f = r.evaluation, r.features
        pixels = r.support.flatten(1).sum(1).tolist()
        fmax = r.feature.flatten(1).amax(1).tolist() if len(r) else []
        cols = {
            "acceleration": r.acceleration.tolist(),
            "row": f.center[:, 0].tolist(),
            "col": f.center[:, 1].tolist(),
            "size0": f.size[:, 0].tolist(),
            "size1": f.size[:, 1].tolist(),
            "angle": f.angle.tolist(),
            "intensity": f.intensity.tolist(),
            "shape_seed": f.seed.tolist(),
            "attack_loss": ev.attack_loss.tolist(),
            "baseline_loss": ev.baseline_loss.tolist(),
            "recovery": ev.recovery.tolist(),
            "ip_loss": ev.ip_loss.tolist(),
            "accepted": ev.accepted.tolist(),
            "success_seed": ev.success_seed.tolist(),
            "success_recovery": ev.success_recovery.tolist(),
            "success": r.success.tolist(),
            "queries": r.queries.tolist(),
            "gradients": r.gradients.tolist(),
        }
        out = []
        for i, key in enumerate(r.keys):
            row = {
                "key": key,
                "fname": r.fname[i],
                "slice": int(r.slice_num[i]),
                "model": model,
                "search": r.search,
                "family": f.family,
                "criterion": r.criterion,
                "pixels": int(pixels[i]),
                "feature_max": float(fmax[i]),
                "loss_threshold": float(r.loss_threshold),
                "ip_threshold": float(r.ip_threshold),
                "modality": r.modality,
            }
            row.update({k: v[i] for k, v in cols.items()})
            out.append({c: row[c] for c in RECORD_COLUMNS})
        return out


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------
def summarize(rows: Sequence[Mapping[str, Any]], criterion: str | None = None, z: float = 1.96) -> dict[str, Any]:
    """Aggregate per-image records (dicts from :meth:`FnafResult.rows`, ``records.csv`` or ``records.jsonl``).

    Args:
        rows: one record per image.
        criterion: ``"seed"``, ``"recovery"`` or ``None`` for each row's own ``criterion``.
        z: the interval's normal quantile (1.96 → 95%).
    Returns:
        ``n``, ``attack_rate`` with ``ci_low``/``ci_high`` (Wilson), the same under both criteria
        (``attack_rate_seed``, ``attack_rate_recovery``), ``mean_attack_loss`` (the seed's "MSE" column: mean of each
        image's worst-case loss), ``mean_baseline_loss`` and ``baseline_saturation`` (the share of images whose found
        feature's neighbourhood already holds, without any feature, as much reconstruction error as the seed
        threshold: there the seed criterion says "lost" whatever the network does with the feature; NaN when the
        records have no reference), ``mean_recovery``, ``ip_acceptance`` and ``mean_ip_loss``, ``mean_queries``.
    """
    n = len(rows)

    def rate(flags: list[bool]) -> tuple[float, float, float]:
        k = sum(flags)
        lo, hi = wilson_interval(k, n, z)
        return (k / n if n else float("nan")), lo, hi

    seed_ok = [_bool(r["success_seed"]) for r in rows]
    rec_ok = [_bool(r["success_recovery"]) for r in rows]
    if criterion is None:
        chosen = [_bool(r["success"]) for r in rows]
        crits = sorted({str(r.get("criterion", "")) for r in rows})
        criterion_name = crits[0] if len(crits) == 1 else "mixed"
    elif criterion in ("seed", "recovery"):
        chosen = seed_ok if criterion == "seed" else rec_ok
        criterion_name = criterion
    else:
        raise BlindspotError(None, f"unknown criterion {criterion!r}")

    def mean(key: str) -> float:
        vals = [_float(r.get(key)) for r in rows]
        vals = [v for v in vals if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    ar, lo, hi = rate(chosen)
    ar_s, lo_s, hi_s = rate(seed_ok)
    ar_r, lo_r, hi_r = rate(rec_ok)
    acc = [_bool(r["accepted"]) for r in rows]
    base = [(_float(r.get("baseline_loss")), _float(r.get("loss_threshold"))) for r in rows]
    base = [(b, t) for b, t in base if math.isfinite(b) and math.isfinite(t)]
    return {
        "n": n,
        "criterion": criterion_name,
        "attack_rate": ar,
        "ci_low": lo,
        "ci_high": hi,
        "attack_rate_seed": ar_s,
        "ci_seed": [lo_s, hi_s],
        "attack_rate_recovery": ar_r,
        "ci_recovery": [lo_r, hi_r],
        "mean_attack_loss": mean("attack_loss"),
        "loss_threshold": mean("loss_threshold"),
        "mean_baseline_loss": sum(b for b, _ in base) / len(base) if base else float("nan"),
        "baseline_saturation": sum(b >= t for b, t in base) / len(base) if base else float("nan"),
        "mean_recovery": mean("recovery"),
        "ip_acceptance": sum(acc) / n if n else float("nan"),
        "mean_ip_loss": mean("ip_loss"),
        "mean_queries": mean("queries"),
        "modality": str(rows[0].get("modality") or "mri") if rows else "mri",
    }


def group_rows(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, float, str], list[Mapping[str, Any]]]:
    """Rows grouped by ``(model, acceleration, search)``, in first-seen order."""
    groups: dict[tuple[str, float, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r.get("model", "")), _float(r["acceleration"]), str(r["search"])), []).append(r)
    return groups


def setting_label(acc: float, modality: str = "mri") -> str:
    """How a setting reads in tables: ``4×`` (MRI acceleration) or ``25% dose`` (CT, ``acc`` = 1/dose)."""
    return f"{100.0 / acc:g}% dose" if modality == "ct" else f"{acc:g}×"


#: The IP statistic's row label per modality (see :mod:`blindspot.physics.acquisition`).
IP_LABEL = {"mri": "IP Loss (MSE)", "ct": "IP detectability d'"}


def table2(summaries: Mapping[tuple[str, float, str], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The seed's Table 2 as rows (for CSV/JSON): per setting and model, each search's attack rate with its 95%
    interval, mean attack loss ("MSE") and image count (:func:`blindspot.report.tables.table2_markdown` renders it).

    Args:
        summaries: ``{(model, acceleration, search): summarize(...)}``.
    """
    searches = list(dict.fromkeys(s for _, _, s in summaries))
    models = list(dict.fromkeys(m for m, _, _ in summaries))
    rows = []
    for acc in sorted({a for _, a, _ in summaries}):
        for m in models:
            row: dict[str, Any] = {"acceleration": acc, "model": m}
            for s in searches:
                sm = summaries.get((m, acc, s))
                row[f"{s}_attack_rate"] = None if sm is None else sm["attack_rate"]
                row[f"{s}_ci_low"] = None if sm is None else sm["ci_low"]
                row[f"{s}_ci_high"] = None if sm is None else sm["ci_high"]
                row[f"{s}_mse"] = None if sm is None else sm["mean_attack_loss"]
                row[f"{s}_n"] = None if sm is None else sm["n"]
            rows.append(row)
    return rows


def ip_table(summaries: Mapping[tuple[str, float, str], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The seed's IP table as two rows ("Acceptance Rate (%)" and the mean IP statistic), one column per (model,
    search, setting) (:func:`blindspot.report.tables.ip_table_markdown` renders it)."""
    cols = list(summaries)
    modality = summaries[cols[0]]["modality"] if cols else "mri"
    names = [f"{m} {s.upper()} {setting_label(a, modality)}".strip() for m, a, s in cols]
    acc_row: dict[str, Any] = {"quantity": "Acceptance Rate (%)"}
    loss_row: dict[str, Any] = {"quantity": IP_LABEL.get(modality, "IP statistic")}
    for name, c in zip(names, cols):
        acc_row[name] = 100 * summaries[c]["ip_acceptance"]
        loss_row[name] = summaries[c]["mean_ip_loss"]
    return [acc_row, loss_row]


def transfer_rate(
    source_rows: Sequence[Mapping[str, Any]],
    target_rows: Sequence[Mapping[str, Any]],
    criterion: str = "seed",
    z: float = 1.96,
) -> dict[str, Any]:
    """How often features that fooled the source model also fool the target (the seed: U-Net → I-RIM, 89.48%).

    Rows are matched by ``(key, acceleration)``. Returns ``n_source_successes``, ``n_matched``, ``transfer_rate``
    (share of matched source successes that succeed on the target) with its Wilson interval, and
    ``target_rate_all`` (the target's attack rate over every replayed feature).
    """
    col = "success_seed" if criterion == "seed" else "success_recovery"
    src = {(r["key"], _float(r["acceleration"])): _bool(r[col]) for r in source_rows}
    tgt = {(r["key"], _float(r["acceleration"])): _bool(r[col]) for r in target_rows}
    matched = [k for k in tgt if src.get(k)]
    k = sum(tgt[m] for m in matched)
    lo, hi = wilson_interval(k, len(matched), z)
    n_all = len(tgt)
    return {
        "criterion": criterion,
        "n_source_successes": sum(src.values()),
        "n_matched": len(matched),
        "transfer_rate": k / len(matched) if matched else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "target_rate_all": sum(tgt.values()) / n_all if n_all else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Saved features (transferability)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SavedFeature:
    """One found feature, as loaded: parameters, the rendered/optimised image and the source run's verdicts."""

    key: str
    acceleration: float
    search: str
    family: str
    params: dict[str, Tensor]
    feature: Tensor  # (1, h, w)
    support: Tensor  # (1, h, w) bool
    success_seed: bool
    success_recovery: bool


@dataclass
class SavedFeatures:
    """Features loaded from one or more files, looked up by ``(key, acceleration, search)``."""

    entries: dict[tuple[str, float, str], SavedFeature] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def searches(self) -> list[str]:
        return sorted({k[2] for k in self.entries})

    def get(self, key: str, acceleration: float, search: str) -> SavedFeature | None:
        return self.entries.get((key, float(acceleration), search))


def save_features(path: PathLike, result: FnafResult, model: str = "") -> Path:
    """Write a result's features atomically: ``path`` (``.pt``, loadable with ``weights_only=True``) and
    ``path.with_suffix(".json")`` (parameters and verdicts, no images)."""
    r = result.cpu()
    payload = {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "model": model,
        "search": r.search,
        "family": r.features.family,
        "max_steps": int(r.features.max_steps),
        "keys": list(r.keys),
        "acceleration": r.acceleration.to(torch.float32),
        "params": {k: v.contiguous() for k, v in r.features.as_dict().items()},
        "feature": r.feature.to(torch.float32).contiguous(),
        "support": r.support.to(torch.bool).contiguous(),
        "success_seed": r.evaluation.success_seed,
        "success_recovery": r.evaluation.success_recovery,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    write_json(path.with_suffix(".json"), {k: v for k, v in payload.items() if k not in ("feature", "support")} | {
        "records": r.rows(model)
    })
    return path


def _load_one(path: Path, into: SavedFeatures) -> None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BlindspotError(path, f"not a loadable features file ({first[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FEATURES_FORMAT:
        raise BlindspotError(path, f"not a {FEATURES_FORMAT} file")
    try:
        keys, accs, feats, sups = obj["keys"], obj["acceleration"], obj["feature"], obj["support"]
        params = obj["params"]
        n = len(keys)
        if feats.ndim != 4 or feats.shape[0] != n or sups.shape != feats.shape or accs.shape[0] != n:
            raise BlindspotError(path, "features, supports and keys do not match in number or shape")
        if not torch.isfinite(feats).all():
            raise BlindspotError(path, "features contain NaN or Inf")
        for i, k in enumerate(keys):
            into.entries[(str(k), float(accs[i]), str(obj["search"]))] = SavedFeature(
                key=str(k),
                acceleration=float(accs[i]),
                search=str(obj["search"]),
                family=str(obj["family"]),
                params={name: t[i] for name, t in params.items()},
                feature=feats[i].to(torch.float32),
                support=sups[i].to(torch.bool),
                success_seed=bool(obj["success_seed"][i]),
                success_recovery=bool(obj["success_recovery"][i]),
            )
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise BlindspotError(path, f"features file is missing or has a malformed field ({err})") from None


def load_features(path: PathLike) -> SavedFeatures:
    """Load saved features from a ``.pt`` file or every ``*.pt`` below a folder (e.g. a run's ``features/``)."""
    path = Path(path)
    out = SavedFeatures()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.pt") if not p.name.startswith("."))
        if not files:
            raise BlindspotError(path, "no saved features (*.pt) in this folder")
        for p in files:
            _load_one(p, out)
    elif path.is_file():
        _load_one(path, out)
    else:
        raise BlindspotError(path, "no such features file or folder")
    return out
