"""The FNAF run: attack one network over a data set under one or more acquisition settings, resumably.

A run folder (:class:`~blindspot.runs.folder.RunFolder`) receives

* ``run.json`` — the settings (a resumed run must use the same ones);
* ``records.jsonl`` — one JSON line per (image, setting, search), appended and synced after every batch;
  ``records.csv`` — the same rows, rewritten atomically after every batch;
* ``features/<search>_<R>x/batch_NNNNN.pt`` (+ ``.json``) — the found features, for replay on another network;
* ``examples/<search>_<R>x.pt`` — images of the clearest failed and successful attacks;
* ``summary.json``, ``tables.md``, ``table2.csv``, ``ip_table.csv`` — attack rates with 95% intervals, mean attack
  loss, IP acceptance and IP statistic (and transfer rates when replaying);
* ``figures/`` — location heat-maps, attack-loss-vs-IP scatter plots and example panels.

Under ``torchrun`` every process attacks its share of the batches and rank 0 merges the records into the files one
process writes (:mod:`blindspot.runs.ranks`). The searches of a batch share its clean reference ``f(N(A(y)))``
(:func:`attack_setting`).

A *setting* is one pass over the data with one acquisition: an MRI acceleration (masks drawn per volume, seeded by
file name) or a CT dose (``R`` is then the dose-reduction factor ``1/dose``). Python API::

    from blindspot.models.loading import load_model
    from blindspot.runs.fnaf import FnafConfig, ct_settings, mri_settings, run_fnaf
    model = load_model("cnn10")
    run = run_fnaf(model.network, ct_settings(model, phantoms=8), FnafConfig(searches=("rs",)), "runs/fnaf-ct")
    print(run.summary["results"])
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from blindspot.attacks.features import CENTER_FRACTION, FAMILIES, FeatureSampler, Region
from blindspot.attacks.fnaf import CRITERIA, FnafObjective
from blindspot.attacks.records import (RECORD_COLUMNS, group_rows, ip_table, load_features, save_features,
                                       summarize, table2, transfer_rate)
from blindspot.attacks.search import (ReplaySearch, Search, build_search, check_searches, example_images,
                                      replay_together)
from blindspot.data.ct_phantom import PhantomPairs, PhantomPatient, scanner_of
from blindspot.data.ldct import LDCTDataset, collate_ct, find_ldct, report_skipped
from blindspot.data.mri import open_mri_dataset
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes, atomic_write_text, read_json, read_jsonl, write_csv, write_json
from blindspot.models.adapters import Network, as_network, eval_mode, model_device
from blindspot.models.loading import LoadedModel
from blindspot.physics.acquisition import LowDoseCTScan
from blindspot.physics.ct import HUNormalization
from blindspot.physics.mri import create_mask_func
from blindspot.report.fnaf_figures import example_panels, location_heatmap, loss_vs_ip_scatter
from blindspot.report.tables import ip_table_markdown, table2_markdown, transfer_list_markdown
from blindspot.runs.folder import RunFolder
from blindspot.runs.ranks import RankRecords, joined, open_folder

#: CT features by default: small discs of 30–100 HU above the tissue (low contrast, like a small hyperdense lesion),
#: in HU rather than as fractions of the image's range (which is dominated by air and bone).
CT_INTENSITY_HU: tuple[float, float] = (30.0, 100.0)


# ----------------------------------------------------------------------------------------------------------------
# Settings: one acquisition and the data it is applied to
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AttackSetting:
    """One pass over the data under one acquisition.

    Attributes:
        label: the records' ``acceleration``: MRI acceleration, or CT dose-reduction factor ``1/dose``.
        physics: what the searches take as their acquisition (an MRI mask function, or a CT ``LowDoseCTScan``).
        dataset: the images (MRI samples, CT pairs or truths).
        collate: batches the dataset's items.
        modality: ``"mri"`` or ``"ct"``.
        batch_list: the batches, already made (shared by the settings of several networks on the same data, e.g. in
            the audit); ``None`` loads them from ``dataset`` on every pass.
        skipped: CT series read with ``skip_bad``: the files left out, ``{"file", "reason"}`` rows (recorded in the
            run's ``run.json``).
    """

    label: float
    physics: Any
    dataset: Dataset
    collate: Callable
    modality: str
    batch_list: list | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    def loader(self, batch_size: int) -> "DataLoader | list":
        """The batches: ``batch_list`` when given, else a loader over ``dataset``."""
        if self.batch_list is not None:
            return self.batch_list
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate, num_workers=0)

    def batches(self, batch_size: int, mine: Callable[[int], bool] = lambda index: True) -> Iterator[tuple[int, Any]]:
        """``(index, batch)`` of the batches whose index ``mine`` accepts, without loading the others (a rank's
        share, :meth:`blindspot.runs.ranks.RankRecords.mine`). Batches are cut from the whole data set, so a batch
        holds the same images whichever process attacks it."""
        if self.batch_list is not None:
            yield from ((i, b) for i, b in enumerate(self.batch_list) if mine(i))
            return
        n = len(self.dataset)
        chosen = [i for i in range((n + batch_size - 1) // batch_size) if mine(i)]
        items = [k for i in chosen for k in range(i * batch_size, min(n, (i + 1) * batch_size))]
        if not items:
            return
        sub = Subset(self.dataset, items)
        loader = DataLoader(sub, batch_size=batch_size, shuffle=False, collate_fn=self.collate, num_workers=0)
        yield from zip(chosen, loader)

    def with_physics(self, physics: Any) -> "AttackSetting":
        """The same data (and batches) under another acquisition object (e.g. another network's normalisation)."""
        return AttackSetting(self.label, physics, self.dataset, self.collate, self.modality, self.batch_list,
                             self.skipped)

    def materialised(self, batch_size: int) -> "AttackSetting":
        """This setting with its batches made once, to be shared."""
        return AttackSetting(self.label, self.physics, self.dataset, self.collate, self.modality,
                             list(self.loader(batch_size)), self.skipped)


def _limit(ds: Dataset, limit: int | None, what: PathLike | None) -> Dataset:
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    if len(ds) == 0:
        raise BlindspotError(what, "no images to attack")
    return ds


def phantom_geometry_of(model: LoadedModel) -> dict[str, Any]:
    """The built-in phantoms a network was trained on (its checkpoint's ``physics["phantom"]``): ``shape``,
    ``recon_size``, ``challenge`` and ``num_coils`` — so that a multi-coil network is attacked on multi-coil data."""
    keep = {"shape": tuple, "recon_size": tuple, "challenge": str, "num_coils": int}
    return {k: keep[k](v) for k, v in (model.physics.get("phantom") or {}).items() if k in keep and v is not None}


def mri_settings(
    data: PathLike | None,
    accelerations: Sequence[float],
    center_fractions: Sequence[float] | None = None,
    mask_type: str = "random",
    crop: tuple[int, int] | None = None,
    limit: int | None = None,
    coil_maps: str | None = "full",
    kspace: bool = False,
    **phantom: Any,
) -> list[AttackSetting]:
    """One setting per acceleration on an MRI data source (:func:`blindspot.data.mri.open_mri_dataset`; ``phantom``
    options — ``volumes``, ``slices``, ``seed``, ``shape``, ``recon_size``, ``challenge``, ``num_coils`` — apply to
    the built-in phantoms). Multi-coil data carry coil maps from the ``coil_maps`` estimator (the attack's multi-coil
    acquisition); ``kspace`` keeps the masked k-space too (for k-space networks)."""
    if center_fractions is not None and len(center_fractions) != len(accelerations):
        raise BlindspotError(None, "give one centre fraction per acceleration")
    cfs = center_fractions or [None] * len(accelerations)
    out = []
    for acc, cf in zip(accelerations, cfs):
        mask_func = create_mask_func(mask_type, [acc], None if cf is None else [cf])
        ds = open_mri_dataset(data, mask_func, crop, coil_maps=coil_maps, kspace=kspace or None,
                              **(phantom if data is None else {}))
        out.append(AttackSetting(float(acc), mask_func, _limit(ds, limit, data), collate_mri, "mri"))
    return out


def ct_acquisition(model: LoadedModel, dose: float | None = None, image_shape: tuple[int, int] | None = None,
                   sample_hu: torch.Tensor | None = None) -> LowDoseCTScan:
    """The low-dose CT acquisition a CT denoiser was trained for: its checkpoint's physics (``I0``, geometry, pixel
    size) and normalisation, at ``dose`` (default: the checkpoint's). A weight-free model without a normalisation gets
    one fitted to ``sample_hu``."""
    phys = dict(model.physics or {})
    dose = float(dose if dose is not None else phys.get("dose", 0.25))
    ct = scanner_of(phys, image_shape)
    if model.normalization:
        norm = HUNormalization.from_dict(model.normalization, model.source)
    elif sample_hu is not None:
        norm = HUNormalization.fit(sample_hu)
    else:
        raise BlindspotError(model.source, "has no CT normalization and no images to fit one to")
    return LowDoseCTScan(ct, dose, norm)


def ct_settings(
    model: LoadedModel,
    data: PathLike | None = None,
    dose: float | None = None,
    phantoms: int = 8,
    size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    skip_bad: bool = False,
) -> list[AttackSetting]:
    """The CT setting of a denoiser: the LDCT layout's (full, low-dose) pairs of ``data`` at ``dose`` (real noise),
    or ``phantoms`` built-in phantom slices (:class:`~blindspot.data.ct_phantom.PhantomPairs`) simulated through the
    network's own scanner model at full and low dose (seeded by ``seed`` and the slice).

    ``skip_bad``: leave out series members that are not readable CT images (and their partner slices) instead of
    failing on the first; each is printed on stderr and kept in the setting's ``skipped`` (and the run's
    ``run.json``). A network without a stored normalisation gets one fitted to the first slice's in-field pixels."""
    dose = float(dose if dose is not None else (model.physics or {}).get("dose", 0.25))
    if data is not None:
        path = Path(data)
        if not path.is_dir():
            raise BlindspotError(path, "CT FNAF data must be a folder in the LDCT layout (full- and low-dose series)")
        patients = find_ldct(path, dose, skip_bad=skip_bad)
        skipped = report_skipped(patients)
        ds: Dataset = LDCTDataset(patients, preload=False)
        first = ds[0]
        sample = first.full if first.field is None else first.full[first.field]  # no out-of-field air in the fit
        acq = ct_acquisition(model, dose, tuple(first.full.shape[-2:]), sample_hu=sample)
        return [AttackSetting(1.0 / dose, acq, _limit(ds, limit, path), collate_ct, "ct", skipped=skipped)]
    if skip_bad:
        raise BlindspotError("--skip-bad", "is for CT series in the LDCT layout (give --data)")
    size = size or int((model.physics.get("image_shape") or [512])[0])
    sample = PhantomPatient("abdomen", seed * 1000).render(0.5, size=size).reshape(1, 1, size, size)
    acq = ct_acquisition(model, dose, (size, size), sample_hu=sample)
    ds = PhantomPairs(phantoms, acq.ct, dose, seed)
    return [AttackSetting(1.0 / dose, acq, _limit(ds, limit, None), collate_ct, "ct")]


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FnafConfig:
    """What the searches do (DESIGN.md §1.2).

    Attributes:
        searches: among ``rs``, ``fd``, ``grad``.
        family: feature family (``None``: the seed's walk for MRI, discs for CT).
        intensity_range: feature intensities (``None``: the family's defaults for MRI — fractions of each image's
            range —, :data:`CT_INTENSITY_HU` in HU for CT); ``absolute``: the range is in the image's units.
        criterion: ``seed`` or ``recovery``.
        region, region_fraction: ``center`` / ``foreground`` / a bool ``(h, w)`` tensor, and the central crop's side.
        candidates, fd_iterations, fd_restarts, grad_steps, grad_step_size, grad_init: search budgets.
        dilation, loss_threshold, threshold_pixels, recovery_threshold, ip_threshold, normalization: the objective's
            settings (``ip_threshold`` ``None``: the acquisition's).
        batch_size, chunk_size: images per batch, most candidates per network call.
        seed: keys every random draw (and a simulated CT input's noise).
        figures: write figures.
        progress: progress bars (``None``: on a terminal).
    """

    searches: tuple[str, ...] = ("rs",)
    family: str | None = None
    intensity_range: tuple[float, float] | None = None
    absolute: bool | None = None
    criterion: str = "seed"
    region: Any = "center"
    region_fraction: float = CENTER_FRACTION
    candidates: int = 11
    fd_iterations: int = 2
    fd_restarts: int = 1
    grad_steps: int = 6
    grad_step_size: float = 0.2
    grad_init: int = 4
    dilation: int = 3
    loss_threshold: float = 1e-3
    threshold_pixels: int | None = 320 * 320
    recovery_threshold: float = 0.5
    ip_threshold: float | None = None
    normalization: str = "perturbed"
    batch_size: int = 4
    chunk_size: int = 64
    seed: int = 0
    figures: bool = True
    progress: bool | None = None

    def check(self) -> None:
        check_searches(self.searches)
        if self.family is not None and self.family not in FAMILIES:
            raise BlindspotError(None, f"unknown feature family {self.family!r}; choose from {', '.join(FAMILIES)}")
        if self.criterion not in CRITERIA:
            raise BlindspotError(None, f"unknown criterion {self.criterion!r}; choose seed or recovery")
        for name in ("batch_size", "chunk_size", "candidates", "grad_init"):
            if getattr(self, name) < 1:
                raise BlindspotError(None, f"--{name.replace('_', '-')} must be >= 1")

    def sampler(self, modality: str) -> FeatureSampler:
        """The feature family for a modality (see ``family`` and ``intensity_range``)."""
        if modality == "ct":
            family = self.family or "disc"
            absolute = True if self.absolute is None else self.absolute
            intensity = self.intensity_range or (CT_INTENSITY_HU if absolute else None)
            return FeatureSampler(family, intensity_range=intensity, absolute=absolute)
        return FeatureSampler(self.family or "walk", intensity_range=self.intensity_range, absolute=bool(self.absolute))

    def region_of(self) -> Region:
        if isinstance(self.region, torch.Tensor):
            return Region("mask", mask=self.region)
        return Region(self.region, fraction=self.region_fraction)

    def objective(self, criterion: str | None = None) -> FnafObjective:
        return FnafObjective(criterion=criterion or self.criterion, dilation=self.dilation,
                             loss_threshold=self.loss_threshold, threshold_pixels=self.threshold_pixels or None,
                             recovery_threshold=self.recovery_threshold, ip_threshold=self.ip_threshold,
                             normalization=self.normalization)

    def build(self, modality: str, criterion: str | None = None, names: Sequence[str] | None = None) -> list[Search]:
        """The configured searches (``names`` or ``searches``) for a modality and criterion."""
        per = {"rs": dict(n_candidates=self.candidates),
               "fd": dict(iterations=self.fd_iterations, restarts=self.fd_restarts),
               "grad": dict(steps=self.grad_steps, step_size=self.grad_step_size, init_candidates=self.grad_init)}
        return [build_search(s, **self.common(modality, criterion), **per[s]) for s in (names or self.searches)]

    def common(self, modality: str, criterion: str | None = None) -> dict[str, Any]:
        return dict(sampler=self.sampler(modality), objective=self.objective(criterion), region=self.region_of(),
                    chunk_size=self.chunk_size, seed=self.seed)


# ----------------------------------------------------------------------------------------------------------------
# The record loop
# ----------------------------------------------------------------------------------------------------------------
def tag(search_name: str, label: float) -> str:
    """The folder name of a (search, setting) pair: ``rs_4x``."""
    return f"{search_name}_{label:g}x"


def record_id(row: Mapping[str, Any]) -> tuple[str, float, str, str]:
    """What identifies a record within one model's run: ``(key, setting label, search, criterion)``."""
    return row["key"], float(row["acceleration"]), row["search"], row["criterion"]


def attack_setting(network: Network, searches: Sequence[Search], setting: AttackSetting, batch_size: int,
                   features_dir: "Path | Sequence[Path | None] | None" = None, done: set | None = None,
                   on_batch: Callable[[Search, Any, Any, list[dict[str, Any]], int], None] | None = None,
                   progress: bool | None = None, desc: str = "fnaf",
                   mine: Callable[[int], bool] = lambda index: True) -> list[dict[str, Any]]:
    """Run ``searches`` over every batch of ``setting``; the records of images not in ``done``.

    The searches of a batch share its :class:`~blindspot.attacks.fnaf.AttackContext` (when their
    :meth:`~blindspot.attacks.search.Search.context_key` agree — any criterion), so each image's clean reference
    ``f(N(A(y)))`` is computed once per batch, in the first search's first model call, whatever the number of searches
    and criteria.

    Args:
        network: the network.
        searches: configured searches.
        setting: data and acquisition.
        batch_size: images per batch.
        features_dir: where each batch's features go (``<dir>/<search>_<R>x/batch_NNNNN.pt``), one folder for every
            search or one per search (``None``: not saved).
        done: :func:`record_id` of the records already written (skipped, and updated).
        on_batch: called ``(search, batch, result, new_rows, batch_index)`` after each search of each batch (the
            run appends and checkpoints its records there).
        mine: which batches (by index over the whole data set) this process attacks (a ``torchrun`` rank's share).
    """
    done = set() if done is None else done
    dirs = list(features_dir) if isinstance(features_dir, (list, tuple)) else [features_dir] * len(searches)
    rows: list[dict[str, Any]] = []
    label = float(setting.label)
    bar = tqdm(setting.batches(batch_size, mine), desc=f"{desc} {label:g}x", unit="batch", leave=False,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    with eval_mode(network.module):
        for bi, batch in bar:
            contexts: dict[tuple, Any] = {}
            for search, fdir in zip(searches, dirs):
                crit = search.objective.criterion
                if all((k, label, search.name, crit) in done for k in batch.keys):
                    continue
                ck = search.context_key()
                if ck not in contexts:
                    contexts[ck] = search.prepare(network, batch, setting.physics)
                result = search.run(network, contexts[ck])
                if len(result) == 0:
                    continue
                new = [r for r in result.rows(network.name) if record_id(r) not in done]
                if fdir is not None:
                    save_features(fdir / tag(search.name, label) / f"batch_{bi:05d}.pt", result, network.name)
                done.update(record_id(r) for r in new)
                rows.extend(new)
                if on_batch is not None:
                    on_batch(search, batch, result, new, bi)
    bar.close()
    return rows


def replay_setting(network: Network, replays: Sequence[ReplaySearch], setting: AttackSetting, batch_size: int,
                   progress: bool | None = None, desc: str = "transfer",
                   mine: Callable[[int], bool] = lambda index: True) -> list[tuple[tuple[int, int, int], dict]]:
    """Replay saved features (``replays``: e.g. every source network, search and criterion of an audit) on ``network``
    over ``setting``: per batch, one context (one clean reference per image) and the replays scored together in
    shared model calls (:func:`~blindspot.attacks.search.replay_together`). Returns ``(order, record)`` pairs, order
    ``(replay index, batch index, position in the batch)``; nothing is written."""
    out: list[tuple[tuple[int, int, int], dict]] = []
    by_context: dict[tuple, list[int]] = {}
    for j, r in enumerate(replays):
        by_context.setdefault(r.context_key(), []).append(j)
    bar = tqdm(setting.batches(batch_size, mine), desc=f"{desc} {float(setting.label):g}x", unit="batch",
               leave=False, disable=None if progress is None else not progress, dynamic_ncols=True)
    with eval_mode(network.module):
        for bi, batch in bar:
            for js in by_context.values():
                ctx = replays[js[0]].prepare(network, batch, setting.physics)
                for j, result in zip(js, replay_together(network, ctx, [replays[j] for j in js])):
                    out += [((j, bi, batch.keys.index(r["key"])), r) for r in result.rows(network.name)]
    bar.close()
    return out


class ExampleStore:
    """The clearest failed and successful attack per (search, setting), with their images, kept on disk."""

    def __init__(self, path: Path, criterion: str):
        self.path = path
        self.criterion = criterion
        self.data: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                self.data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged example file is only a figure: rebuild it
                self.data = {}

    def _value(self, row: Mapping[str, Any]) -> float:
        return 1.0 - float(row["recovery"]) if self.criterion == "recovery" else float(row["attack_loss"])

    def offer(self, rows: Sequence[Mapping[str, Any]], fetch: Callable[[list[int]], list[dict]]) -> None:
        """``fetch(indices) -> image dicts`` re-runs the chosen rows (only when an example improves)."""
        picks: dict[str, int] = {}
        succ = [i for i, r in enumerate(rows) if r["success"]]
        fail = [i for i, r in enumerate(rows) if r["accepted"] and not r["success"]]
        if succ:
            i = max(succ, key=lambda k: self._value(rows[k]))
            old = self.data.get("successful")
            if old is None or self._value(rows[i]) > old["value"]:
                picks["successful"] = i
        if fail:
            i = min(fail, key=lambda k: self._value(rows[k]))
            old = self.data.get("failed")
            if old is None or self._value(rows[i]) < old["value"]:
                picks["failed"] = i
        if not picks:
            return
        names = list(picks)
        for n, img in zip(names, fetch([picks[n] for n in names])):
            img["value"] = self._value(rows[picks[n]])
            self.data[n] = img
        self.save()

    def save(self) -> None:
        buf = io.BytesIO()
        torch.save(self.data, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    @classmethod
    def merge(cls, path: Path, criterion: str) -> None:
        """Fold the per-rank stores ``<stem>.rankRRRRR.pt`` of a ``torchrun`` job into ``path`` (the clearest of
        all; a tie keeps the lower rank's) and remove them."""
        parts = sorted(path.parent.glob(f"{path.stem}.rank*.pt"))
        if not parts:
            return
        store = cls(path, criterion)
        for p in parts:
            other = cls(p, criterion).data
            for name, better in (("successful", lambda a, b: a > b), ("failed", lambda a, b: a < b)):
                if name in other and (name not in store.data or better(other[name]["value"],
                                                                       store.data[name]["value"])):
                    store.data[name] = other[name]
        store.data = {k: store.data[k] for k in ("failed", "successful") if k in store.data}
        if store.data:
            store.save()
        for p in parts:
            p.unlink()


@dataclass
class FnafRun:
    """What :func:`run_fnaf` returns (everything is also in the run folder)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path
    markdown: str = ""
    figures: list[Path] = field(default_factory=list)


def run_fnaf(
    model: "LoadedModel | Network | nn.Module",
    settings: Sequence[AttackSetting],
    config: FnafConfig,
    out_dir: PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    replay: PathLike | None = None,
    replay_searches: Sequence[str] | None = None,
    run_settings: Mapping[str, Any] | None = None,
    inputs: Sequence[PathLike | None] = (),
    name: str | None = None,
) -> FnafRun:
    """Attack ``model`` under every setting and write the run folder (see the module docs).

    Args:
        model: a loaded model, a :class:`~blindspot.models.adapters.Network` or a bare module (image convention unless
            it declares another).
        settings: from :func:`mri_settings` / :func:`ct_settings` (or your own).
        config: :class:`FnafConfig`.
        out_dir: the run folder.
        resume / overwrite: continue / replace a run already there (otherwise a folder with records is refused).
        replay: another run's folder whose features are replayed on this model (transferability) instead of searching;
            ``replay_searches``: which of its searches (default: all it saved).
        run_settings: what identifies the run's records beyond ``config`` (model, data…), stored in ``run.json``.
        inputs: the data paths (the run folder may not lie inside them).
        name: the model's label (default: the network's name).
    """
    config.check()
    network = model.network if isinstance(model, LoadedModel) else as_network(model)
    if name:
        network.name = name
    modalities = {s.modality for s in settings}
    if len(modalities) != 1:
        raise BlindspotError(None, "every setting of a run must be of one modality")
    modality = modalities.pop()
    stored = {**{k: v for k, v in vars(config).items() if k not in ("figures", "progress", "batch_size",
                                                                        "chunk_size", "region")},
              "region": config.region if isinstance(config.region, str) else "mask",
              "settings": [s.label for s in settings], "modality": modality, "replay": str(replay) if replay else None,
              **dict(run_settings or {})}
    skipped = [row for s in settings for row in s.skipped]
    if skipped:  # --skip-bad: what was left out of the data is part of the run's identity
        stored["skipped"] = skipped
    device = model_device(network.module, torch.device("cpu"))
    with joined(device) as ranks:
        folder = open_folder(ranks, lambda writer: RunFolder(out_dir, "fnaf", stored, resume=resume,
                                                             overwrite=overwrite, inputs=[*inputs, replay],
                                                             writer=writer))
        log = RankRecords(folder, ranks)
        out = folder.path
        source_rows: list[dict[str, Any]] = []
        if replay is not None:
            src = Path(replay)
            saved = load_features(src / "features" if (src / "features").is_dir() else src)
            searches = [ReplaySearch(saved=saved, source_search=s, **config.common(modality))
                        for s in (replay_searches or saved.searches())]
            source_rows = read_jsonl(src / "records.jsonl")
        else:
            searches = config.build(modality)
        rows = log.rows()
        done = {record_id(r) for r in rows}
        objective = config.objective()
        suffix = f".rank{ranks.rank:05d}" if log.sharded else ""
        for si, setting in enumerate(settings):
            examples = {s.name: ExampleStore(out / "examples" / f"{tag(s.name, setting.label)}{suffix}.pt",
                                             config.criterion) for s in searches}

            def record(search, batch, result, new, bi, setting=setting, examples=examples, si=si):
                examples[search.name].offer(new, lambda which: example_images(
                    network, batch, setting.physics, result, objective,
                    [result.keys.index(new[w]["key"]) for w in which], seed=config.seed))
                j = next(i for i, s in enumerate(searches) if s is search)
                log.append(new, [(si, bi, j, batch.keys.index(r["key"])) for r in new])
                rows.extend(new)
                if not log.sharded:
                    write_csv(out / "records.csv", rows, RECORD_COLUMNS)

            attack_setting(network, searches, setting, config.batch_size, out / "features", done, record,
                           config.progress if ranks.is_main else False, desc=f"fnaf {network.name}", mine=log.mine)
        if log.sharded:
            rows = log.merge()
        if ranks.is_main:  # (also the per-rank examples an interrupted torchrun job left behind)
            for setting in settings:
                for s in searches:
                    ExampleStore.merge(out / "examples" / f"{tag(s.name, setting.label)}.pt", config.criterion)
        if not ranks.is_main:
            ranks.barrier()  # rank 0 writes the summary and figures
            summary = read_json(out / "summary.json")
            return FnafRun(rows, summary, out, "", [])
        if rows:
            write_csv(out / "records.csv", rows, RECORD_COLUMNS)
        summary = write_summary(out, rows, network.name, config, stored, source_rows)
        figures = write_figures(out, rows, config) if config.figures else []
        ranks.barrier()
    return FnafRun(rows, summary, out, summary["tables_markdown"], figures)


# ----------------------------------------------------------------------------------------------------------------
# Summary and figures
# ----------------------------------------------------------------------------------------------------------------
def write_summary(out: Path, rows: Sequence[dict[str, Any]], model_name: str, config: FnafConfig,
                  stored: Mapping[str, Any], source_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``, ``tables.md``, ``table2.csv`` and ``ip_table.csv`` of a run's records."""
    groups = group_rows(rows)
    summaries = {k: summarize(v) for k, v in groups.items()}
    t2_rows, t2_md = table2(summaries), table2_markdown(summaries)
    ip_rows, ip_md = ip_table(summaries), ip_table_markdown(summaries)
    results: dict[str, dict[str, Any]] = {}
    for (m, acc, s), sm in summaries.items():
        results.setdefault(f"{acc:g}x", {})[s] = sm
    transfer: dict[str, dict[str, Any]] = {}
    for (m, acc, s), v in groups.items():
        if not s.startswith("replay-") or not source_rows:
            continue
        src_search = s[len("replay-"):]
        src = [r for r in source_rows if r["search"] == src_search and float(r["acceleration"]) == acc]
        tr = transfer_rate(src, v, criterion=config.criterion)
        tr["source_model"] = src[0]["model"] if src else ""
        tr["target_model"] = m
        transfer.setdefault(f"{acc:g}x", {})[src_search] = tr
    md = "## FNAF attack (Table 2)\n\n" + t2_md + "\n## Information preservation\n\n" + ip_md
    if transfer:
        md += "\n## Transferability\n\n" + transfer_list_markdown(transfer)
    summary = {"model": model_name, "criterion": config.criterion, "family": config.family,
               "modality": stored.get("modality"), "settings": dict(stored), "results": results, "table2": t2_rows,
               "ip_table": ip_rows, "transfer": transfer, "tables_markdown": md}
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "tables.md", md)
    if t2_rows:
        write_csv(out / "table2.csv", t2_rows)
        write_csv(out / "ip_table.csv", ip_rows)
    return summary


def write_figures(out: Path, rows: Sequence[dict[str, Any]], config: FnafConfig) -> list[Path]:
    """Location heat-maps, loss-vs-IP scatter plots and example panels per (search, setting)."""
    figs = out / "figures"
    written = []
    for (m, acc, s), v in group_rows(rows).items():
        t = tag(s, acc)
        ex_path = out / "examples" / f"{t}.pt"
        examples: dict[str, Any] = {}
        if ex_path.exists():
            try:
                examples = torch.load(ex_path, map_location="cpu", weights_only=True)
            except Exception:
                examples = {}
        shape = None
        for e in examples.values():
            shape = tuple(e["truth"].shape[-2:])
        if shape is None:  # no example yet: bound the plot by the recorded locations
            shape = (int(max(float(r["row"]) for r in v)) + 1, int(max(float(r["col"]) for r in v)) + 1)
        box = Region("center", fraction=config.region_fraction).box(*shape) if config.region == "center" else None
        written.append(location_heatmap(v, shape, figs / f"locations_{t}.png", region_box=box,
                                        title=f"{m} {s.upper()} {acc:g}x: FNAF locations"))
        written.append(loss_vs_ip_scatter(v, figs / f"loss_vs_ip_{t}.png", float(v[0]["loss_threshold"]),
                                          float(v[0].get("ip_threshold", 1e-4)), title=f"{m} {s.upper()} {acc:g}x"))
        ordered = {k: examples[k] for k in ("failed", "successful") if k in examples}
        written.append(example_panels(ordered, figs / f"examples_{t}.png", title=f"{m} {s.upper()} {acc:g}x"))
    return [p for p in written if p is not None]
