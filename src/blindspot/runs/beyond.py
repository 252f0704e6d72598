"""Beyond the seeds (issue 15): hallucination maps, ℓ2 worst-case measurement perturbations, false-positive attacks
and sampling-rate stability, for any set of MRI networks (CT denoisers: worst case and false positives), as Python
calls, ``blindspot`` commands and one audit section.

Each section writes its own run folder (:class:`~blindspot.runs.folder.RunFolder`): ``run.json``, ``records.jsonl``
(appended after every batch: ``resume`` continues where a run stopped), ``records.csv``, ``summary.json``,
``tables.md``, ``section.html`` (self-contained, for the audit report), ``report.html`` (the same as a page) and
``figures/``.

* :func:`run_hallucinations` — per image, the measured and null-space parts of ``f(input) − truth`` and of
  ``f(input)`` (:mod:`blindspot.attacks.hallucination`), summarised per model and acceleration, with maps.
* :func:`run_worst_case` — error-amplification curves: reconstruction error against the budget ε for the PGD worst
  case and for random perturbations of the same norm (:class:`~blindspot.attacks.measurement.WorstCasePGD`).
* :func:`run_false_positive` — the attack rate of :class:`~blindspot.attacks.measurement.FalsePositiveAttack` at a
  fixed budget, the rate against the budget, and the budget each image needs.
* :func:`run_sampling` — SSIM / NMSE of every network (and the zero-filled input) over accelerations with the same
  mask family (centre fraction ``0.32 / R``, fastMRI's 0.08 at 4x and 0.04 at 8x), flagged where more samples made it
  worse. With seeded random masks the masks of one image are nested (the same uniform draws against a lower
  threshold), so a lower acceleration strictly adds measurements.
* :func:`run_beyond_audit` — all four into ``out/beyond/<section>``, returned as one :class:`BeyondSection`.

Python API::

    from blindspot.runs.beyond import BeyondConfig, build_settings, run_worst_case
    from blindspot.models.loading import load_model
    models = [load_model("unet")]
    settings = build_settings(models, accelerations=(4.0,), volumes=1, slices=4)
    run = run_worst_case(models, settings, "runs/worst-case", BeyondConfig(budgets=(0.01, 0.03)))
    print(run.markdown)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from blindspot.attacks.features import FAMILIES, FeatureSampler, Region
from blindspot.attacks.fnaf import NORMALIZATIONS, Truths, as_truths
from blindspot.attacks.hallucination import HALLUCINATION_COLUMNS, hallucination_maps
from blindspot.attacks.measurement import (FALSE_POSITIVE_COLUMNS, WORST_CASE_COLUMNS,
                                           FalsePositiveAttack, WorstCasePGD, clean_output, prepare_measurements)
from blindspot.attacks.records import setting_label
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_text, write_csv, write_json
from blindspot.metrics import VolumeMetrics, mean_std, wilson_interval
from blindspot.models.adapters import eval_mode
from blindspot.models.loading import LoadedModel
from blindspot.physics.mri import MASK_TYPES, MaskFunc, create_mask_func
from blindspot.report.beyond_figures import (amplification_curves, fmt, image_panels, sampling_curves, section_html,
                                             standalone_page, success_curves)
from blindspot.report.tables import markdown_table
from blindspot.runs.fnaf import AttackSetting, ct_acquisition, ct_settings, mri_settings, phantom_geometry_of
from blindspot.runs.folder import RunFolder

SECTIONS: tuple[str, ...] = ("hallucinations", "worst_case", "false_positive", "sampling")
Settings = Mapping[float, Mapping[str, AttackSetting]]

#: Default relative budgets per preset and modality: worst case ε, and the false-positive ladder with its fixed budget.
#: MRI budgets are fractions of the measured k-space's norm; CT budgets fractions of the input noise's norm (a small
#: disc's own trace in a 25 % dose input is about 0.07 of it, so CT ladders reach higher).
BUDGETS: dict[str, dict[str, tuple[float, ...]]] = {
    "full": {"mri": (0.01, 0.02, 0.05), "ct": (0.1, 0.3, 1.0)},
    "demo": {"mri": (0.01, 0.03), "ct": (0.3, 1.0)},
}
FP_BUDGETS: dict[str, dict[str, tuple[tuple[float, ...], float]]] = {
    "full": {"mri": ((0.005, 0.01, 0.02, 0.05, 0.1), 0.02), "ct": ((0.02, 0.05, 0.1, 0.2, 0.5), 0.1)},
    "demo": {"mri": ((0.01, 0.03, 0.1), 0.03), "ct": ((0.05, 0.1, 0.3), 0.1)},
}


@dataclass
class BeyondConfig:
    """What the sections measure (defaults: the ``blindspot`` commands'; :meth:`demo` is the audit's small budget).

    Attributes:
        sections: which of :data:`SECTIONS` the audit runs.
        images: most images per setting for the hallucination maps (``None``: all).
        attack_images: most images per setting for the worst-case and false-positive attacks (``None``: all).
        attack_settings: how many settings (accelerations, first ones first) the two attacks run on (``None``: all).
        budgets, steps, step_factor, random_draws: the worst-case PGD (relative budgets ε; ``None``: the preset's
            for the modality, :data:`BUDGETS`).
        fp_budgets, fp_budget: the false-positive budget ladder and the fixed budget of its attack rate (``None``:
            the preset's, :data:`FP_BUDGETS`; a ladder without a fixed budget takes its middle one, a fixed budget is
            added to the ladder).
        fp_steps: PGD steps per false-positive budget.
        fp_family, fp_intensity, fp_absolute: the false-positive feature (a family of
            :data:`~blindspot.attacks.features.FAMILIES`; intensities as fractions of the image's range, or absolute
            in the data's units, HU for CT; ``None``: the family's default, CT 30–100 HU).
        fp_threshold: appearance at which the feature is present (0.5).
        sampling_accelerations: the sampling-rate curve's accelerations.
        sampling_images: most images for it (``None``: all of the first setting's).
        sampling_tolerance: a flag needs the metric at more samples to be worse by more than this.
        mask_type: the mask family (``None``: the settings' mask function's).
        normalization: ``perturbed`` or ``clean`` statistics for a perturbed input.
        batch_size, chunk_size: images per batch, most items per network call.
        seed: keys every random draw.
        figures: write figures.
        preset: ``"full"`` or ``"demo"``: whose default budgets apply.
    """

    sections: tuple[str, ...] = SECTIONS
    images: int | None = None
    attack_images: int | None = 16
    attack_settings: int | None = None
    budgets: tuple[float, ...] | None = None
    steps: int = 10
    step_factor: float = 2.5
    random_draws: int = 4
    fp_budgets: tuple[float, ...] | None = None
    fp_budget: float | None = None
    fp_steps: int = 10
    fp_family: str = "disc"
    fp_intensity: tuple[float, float] | None = None
    fp_absolute: bool | None = None
    fp_threshold: float = 0.5
    sampling_accelerations: tuple[float, ...] = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    sampling_images: int | None = None
    sampling_tolerance: float = 0.0
    mask_type: str | None = None
    normalization: str = "perturbed"
    batch_size: int = 8
    chunk_size: int = 32
    seed: int = 0
    figures: bool = True
    preset: str = "full"

    @classmethod
    def demo(cls, **overrides: Any) -> "BeyondConfig":
        """The audit's default: small enough for the demo's time budget (see ``docs/beyond.md`` for its cost)."""
        base = dict(images=12, attack_images=2, attack_settings=1, steps=4, random_draws=2, fp_steps=4,
                    sampling_accelerations=(2.0, 4.0, 8.0), sampling_images=6, preset="demo")
        return cls(**{**base, **overrides})

    def check(self) -> None:
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad:
            raise BlindspotError(None, f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
        if self.normalization not in NORMALIZATIONS:
            raise BlindspotError(None, f"unknown normalisation {self.normalization!r}; choose perturbed or clean")
        for name in ("images", "attack_images", "attack_settings", "sampling_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise BlindspotError(None, f"{name.replace('_', '-')} must be >= 1")
        for name in ("steps", "fp_steps", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise BlindspotError(None, f"{name.replace('_', '-')} must be >= 1")
        if self.preset not in BUDGETS:
            raise BlindspotError(None, f"unknown preset {self.preset!r}; choose from {', '.join(BUDGETS)}")
        for name in ("budgets", "fp_budgets", "sampling_accelerations"):
            vals = getattr(self, name)
            if vals is not None and (not vals or any(not (float(v) > 0 and math.isfinite(float(v))) for v in vals)):
                raise BlindspotError(None, f"{name.replace('_', '-')} must be positive numbers, got {list(vals)}")
        if self.fp_budget is not None and not (self.fp_budget > 0 and math.isfinite(self.fp_budget)):
            raise BlindspotError(None, f"the fixed false-positive budget must be positive, got {self.fp_budget}")
        if any(float(a) < 1 for a in self.sampling_accelerations):
            raise BlindspotError(None, "sampling accelerations must be >= 1")
        if self.fp_family not in FAMILIES:
            raise BlindspotError(None, f"unknown feature family {self.fp_family!r}; choose from {', '.join(FAMILIES)}")
        if not 0 < self.fp_threshold <= 1:
            raise BlindspotError(None, "the appearance threshold must be in (0, 1]")
        if self.mask_type is not None and self.mask_type not in MASK_TYPES:
            raise BlindspotError(None, f"unknown mask type {self.mask_type!r}; choose from {sorted(MASK_TYPES)}")

    def budgets_for(self, modality: str) -> tuple[float, ...]:
        """The worst case's budgets for a modality."""
        return tuple(float(b) for b in (self.budgets or BUDGETS[self.preset][modality]))

    def fp_ladder(self, modality: str) -> tuple[tuple[float, ...], float]:
        """``(ladder, fixed budget)`` of the false-positive attack for a modality."""
        ladder, fixed = FP_BUDGETS[self.preset][modality]
        if self.fp_budgets is not None:
            ladder = tuple(sorted(float(b) for b in self.fp_budgets))
            fixed = ladder[len(ladder) // 2]
        if self.fp_budget is not None:
            fixed = float(self.fp_budget)
            ladder = tuple(sorted({*ladder, fixed}))
        return ladder, fixed

    def worst_case(self, modality: str) -> WorstCasePGD:
        return WorstCasePGD(budgets=self.budgets_for(modality), steps=self.steps, step_factor=self.step_factor,
                            random_draws=self.random_draws, normalization=self.normalization,
                            chunk_size=self.chunk_size, seed=self.seed)

    def false_positive(self, modality: str, keep_images: bool = False) -> FalsePositiveAttack:
        absolute = (modality == "ct") if self.fp_absolute is None else self.fp_absolute
        intensity = self.fp_intensity or ((30.0, 100.0) if modality == "ct" and absolute else None)
        return FalsePositiveAttack(sampler=FeatureSampler(self.fp_family, intensity_range=intensity,
                                                          absolute=absolute),
                                   region=Region(), budgets=self.fp_ladder(modality)[0], steps=self.fp_steps,
                                   step_factor=self.step_factor, threshold=self.fp_threshold,
                                   normalization=self.normalization, chunk_size=self.chunk_size, seed=self.seed,
                                   keep_images=keep_images)


@dataclass
class SectionResult:
    """One section: its records, summary rows, ``results.json`` entry, Markdown, HTML fragment and figures
    (``(kind, caption, png path)``), and where its run folder is."""

    name: str
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    results: dict[str, Any]
    markdown: str
    html: str
    figures: list[tuple[str, str, Path]]
    out: Path
    seconds: float = 0.0


@dataclass
class BeyondSection:
    """What :func:`run_beyond_audit` gives the audit: ``results`` (its ``results.json`` ``"beyond"`` entry),
    ``markdown``, ``html_sections`` (one self-contained ``<section>`` each), ``figures`` and ``timings`` (s)."""

    results: dict[str, Any]
    markdown: str
    html_sections: list[str] = field(default_factory=list)
    figures: list[tuple[str, str, Path]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Settings and data
# ----------------------------------------------------------------------------------------------------------------
def build_settings(models: Sequence[LoadedModel], data: PathLike | None = None, accelerations: Sequence[float] = (4.0,),
                   center_fractions: Sequence[float] | None = None, mask_type: str | None = None,
                   crop: tuple[int, int] | None = None, volumes: int = 2, slices: int = 4, seed: int = 100,
                   limit: int | None = None, dose: float | None = None, coil_maps: str | None = "full",
                   batch_size: int = 8, skip_bad: bool = False) -> dict[float, dict[str, AttackSetting]]:
    """``{label: {model name: setting}}`` as the audit builds them: MRI one shared setting per acceleration (masks
    seeded per volume; geometry of the first network's training phantoms without ``data``), CT one dose with each
    denoiser's own normalisation (``skip_bad``: see :func:`~blindspot.runs.fnaf.ct_settings`; what it left out is
    recorded in every section's ``run.json``)."""
    if not models:
        raise BlindspotError(None, "no models")
    modalities = {m.modality for m in models}
    if len(modalities) != 1:
        raise BlindspotError(None, "give networks of one modality")
    first = models[0]
    if first.modality == "ct":
        (base,) = ct_settings(first, data, dose, volumes * slices, None, seed, limit, skip_bad=skip_bad)
        base = base.materialised(batch_size)
        truths = as_truths(base.batch_list[0])
        img = truths.image[:1] if truths.field is None else truths.image[:1][truths.field[:1]]  # in-field pixels
        return {base.label: {m.name: base.with_physics(ct_acquisition(m, base.physics.dose,
                                                                      tuple(truths.image.shape[-2:]), img))
                             for m in models}}
    if skip_bad:
        raise BlindspotError("--skip-bad", "is for CT series (LDCT layout); these are MRI networks")
    if crop is None and first.physics.get("crop"):
        crop = tuple(int(c) for c in first.physics["crop"])
    kind = mask_type or first.physics.get("mask_type") or "random"
    needs_kspace = any(m.network.needs_measurements for m in models)
    phantom = {**phantom_geometry_of(first), "volumes": volumes, "slices": slices, "seed": seed}
    out: dict[float, dict[str, AttackSetting]] = {}
    for s in mri_settings(data, accelerations, center_fractions, kind, crop, limit, coil_maps=coil_maps,
                          kspace=needs_kspace, **phantom):
        shared = s.materialised(batch_size)
        out[shared.label] = {m.name: shared for m in models}
    return out


def _batches(setting: AttackSetting, batch_size: int, limit: int | None) -> Iterator[tuple[Truths, Any]]:
    """``(truths, max values or None)`` of the setting's first ``limit`` images."""
    seen = 0
    for batch in setting.loader(batch_size):
        if limit is not None and seen >= limit:
            return
        t = as_truths(batch)
        mv = getattr(batch, "max_value", None)
        if limit is not None and seen + len(t) > limit:
            keep = list(range(limit - seen))
            t = t.subset(keep)
            mv = None if mv is None else mv[: len(keep)]
        seen += len(t)
        yield t, mv


def _folder(out: PathLike, section: str, config: BeyondConfig, models: Sequence[LoadedModel], settings: Settings,
            resume: bool, overwrite: bool, extra: Mapping[str, Any] | None = None) -> RunFolder:
    stored = {k: v for k, v in asdict(config).items() if k not in ("figures", "batch_size", "chunk_size",
                                                                    "sections")}
    stored = {k: (list(v) if isinstance(v, tuple) else v) for k, v in stored.items()}
    stored.update(models=[m.name for m in models], settings=[float(s) for s in settings], **dict(extra or {}))
    skipped = [row for per in settings.values() for row in next(iter(per.values())).skipped]
    if skipped:  # --skip-bad: what was left out of the data
        stored["skipped"] = skipped
    return RunFolder(out, f"beyond-{section}", stored, resume=resume, overwrite=overwrite)


def _bar(items: Sequence[Any], progress: bool | None, desc: str):
    return tqdm(items, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress,
                dynamic_ncols=True)


def _attack_missing(models: Sequence[LoadedModel], settings: Settings, labels: Sequence[float], config: BeyondConfig,
                    folder: RunFolder, rows: list[dict[str, Any]], progress: bool | None, desc: str,
                    attack: Callable[[LoadedModel, float, AttackSetting, Truths, bool], list[dict[str, Any]]]) -> None:
    """Run ``attack(model, label, setting, truths, first)`` on the first ``config.attack_images`` images of every
    (setting, model) that ``rows`` does not hold yet (``first``: the batch holds the setting's first image); its
    records, tagged with the setting's label, are appended to ``folder`` (durably, per batch) and to ``rows``."""
    done = {(r["model"], float(r["acceleration"]), r["key"]) for r in rows}
    for label in labels:
        for m in models:
            setting = settings[label][m.name]
            batches = list(_batches(setting, config.batch_size, config.attack_images))
            for bi, (truths, _) in enumerate(_bar(batches, progress, f"{desc} {m.name} {label:g}x")):
                todo = [i for i, k in enumerate(truths.keys) if (m.name, float(label), k) not in done]
                if not todo:
                    continue
                new = attack(m, label, setting, truths.subset(todo), bi == 0 and todo[0] == 0)
                for r in new:
                    r["acceleration"] = float(label)
                folder.append(new)
                rows.extend(new)
                done.update((m.name, float(label), r["key"]) for r in new)


def _modality(settings: Settings) -> str:
    return next(iter(next(iter(settings.values())).values())).modality


def _finish(name: str, out: Path, rows: list[dict[str, Any]], columns: Sequence[str], summary: list[dict[str, Any]],
            results: dict[str, Any], markdown: str, title: str, intro: str,
            figures: list[tuple[str, str, Path]], t0: float) -> SectionResult:
    write_csv(out / "records.csv", rows, columns)
    if summary:
        write_csv(out / "summary.csv", summary)
    write_json(out / "summary.json", {"section": name, **results})
    atomic_write_text(out / "tables.md", markdown)
    frag = section_html(title, intro, markdown, [(c, p) for _, c, p in figures], anchor=name)
    atomic_write_text(out / "section.html", frag + "\n")
    atomic_write_text(out / "report.html", standalone_page(f"blindspot: {title}", frag))
    return SectionResult(name, rows, summary, results, markdown, frag, figures, out, time.perf_counter() - t0)


def _ms(values: Sequence[Any]) -> tuple[float, float]:
    """Mean and std of the finite values (records read back from JSON hold ``None`` for NaN)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return mean_std(vals) if vals else (float("nan"), float("nan"))


# ----------------------------------------------------------------------------------------------------------------
# 1. Hallucination maps
# ----------------------------------------------------------------------------------------------------------------
HALLUCINATION_INTRO = (
    "Every reconstruction error e = f(input) − truth split into the part the measurements see (measured: P_r e, on "
    "the sampled k-space of every coil) and the part they cannot see (null space: P_n e, the unsampled k-space); the "
    "two add up to the NMSE. A data-consistent network has no measured error; the null-space error is what the "
    "network invented or missed where the scan is silent (Bhadra et al., IEEE TMI 2021). Energies relative to "
    "‖truth‖², mean ± std over images; maps: one image per model, |P_n e| and |P_r e| on one colour scale per row.")


def run_hallucinations(models: Sequence[LoadedModel], settings: Settings, out: PathLike, config: BeyondConfig,
                       progress: bool | None = None, resume: bool = False, overwrite: bool = False) -> SectionResult:
    """Hallucination maps of every network under every MRI setting (see the module docs). CT settings have no null
    space: the section then records nothing and says so."""
    t0 = time.perf_counter()
    config.check()
    folder = _folder(out, "hallucinations", config, models, settings, resume, overwrite)
    out = folder.path
    rows = folder.records()
    title = "Hallucinations: null-space maps"
    if _modality(settings) == "ct":
        md = "Not applicable: a low-dose CT input measures every pixel (no null space).\n"
        return _finish("hallucinations", out, [], HALLUCINATION_COLUMNS, [], {"applicable": False}, md, title,
                       HALLUCINATION_INTRO, [], t0)
    done = {(r["model"], float(r["acceleration"]), r["key"]) for r in rows}
    panels: dict[tuple[float, str], tuple[str, dict[str, Any]]] = {}  # the first image's maps, for the figure
    for label, per_model in settings.items():
        for m in models:
            setting = per_model[m.name]
            batches = list(_batches(setting, config.batch_size, config.images))
            for bi, (truths, _) in enumerate(_bar(batches, progress, f"hallucinations {m.name} {label:g}x")):
                if all((m.name, float(label), k) in done for k in truths.keys):
                    continue
                res = hallucination_maps(m.network, truths, setting.physics, return_maps=bi == 0)
                if res.maps is not None:
                    panels[(label, m.name)] = (truths.keys[0], {k: v[0] for k, v in res.maps.items()})
                new = [r for r in res.rows(m.name) if (m.name, float(label), r["key"]) not in done]
                for r in new:
                    r["acceleration"] = float(label)
                folder.append(new)
                rows.extend(new)
                done.update((m.name, float(label), r["key"]) for r in new)
    keys = ("error", "measured_error", "null_error", "null_error_fraction", "output_null", "truth_null")
    summary = []
    for label in settings:
        for m in models:
            g = [r for r in rows if r["model"] == m.name and float(r["acceleration"]) == float(label)]
            if not g:
                continue
            s: dict[str, Any] = {"model": m.name, "acceleration": float(label), "images": len(g)}
            for k in keys:
                s[f"{k}_mean"], s[f"{k}_std"] = _ms([r[k] for r in g])
            summary.append(s)
    md = markdown_table(
        ("model", "R", "images", "NMSE", "measured error", "null-space error", "null share of error",
         "output null energy", "truth null energy"),
        [(s["model"], f"{s['acceleration']:g}x", s["images"],
          *(f"{fmt(s[f'{k}_mean'], 3)} ± {fmt(s[f'{k}_std'], 2)}" for k in keys)) for s in summary],
        "**Energies relative to ‖truth‖² (mean ± std over images)**")
    figures: list[tuple[str, str, Path]] = []
    if config.figures:
        for label, per_model in settings.items():
            panel = []
            for m in models:
                if (label, m.name) not in panels:  # resumed: recompute the first image's maps
                    truths, _ = next(_batches(per_model[m.name], 1, 1))
                    res = hallucination_maps(m.network, truths, per_model[m.name].physics, return_maps=True)
                    panels[(label, m.name)] = (truths.keys[0], {k: v[0] for k, v in res.maps.items()})
                key, maps = panels[(label, m.name)]
                panel.append((f"{m.name}\n{key}", maps))
            path = image_panels(panel, (("truth", "truth", "gray"), ("output", "reconstruction", "gray"),
                                        ("null_error", "|null-space error|", "heat"),
                                        ("measured_error", "|measured error|", "heat")),
                                out / "figures" / f"hallucinations_{label:g}x.png",
                                title=f"{label:g}x: where the error lies")
            figures.append(("hallucinations", f"Hallucination maps, {label:g}x", path))
    results = {"applicable": True, "summary": summary}
    return _finish("hallucinations", out, rows, HALLUCINATION_COLUMNS, summary, results, md, title,
                   HALLUCINATION_INTRO, figures, t0)


# ----------------------------------------------------------------------------------------------------------------
# 2. Worst-case measurement perturbations
# ----------------------------------------------------------------------------------------------------------------
WORST_CASE_INTRO = (
    "An ℓ2-bounded perturbation e of the measurements (MRI: the sampled k-space of every coil; CT: the low-dose "
    "input), ‖e‖ ≤ ε × the measurements' norm (CT: × the input noise's norm), found by projected gradient ascent on "
    "the reconstruction error, beside random perturbations of exactly the same norm (Antun et al., PNAS 2020). "
    "Error: MRI ‖x̂ − y‖/‖y‖, CT RMSE in HU. Gain: ‖x̂(e) − x̂(0)‖/‖e‖, how much the network amplifies a measurement "
    "change (1 passes it through unchanged). Means over images.")


def _attack_labels(settings: Settings, config: BeyondConfig) -> list[float]:
    labels = list(settings)
    return labels if config.attack_settings is None else labels[: config.attack_settings]


def run_worst_case(models: Sequence[LoadedModel], settings: Settings, out: PathLike, config: BeyondConfig,
                   progress: bool | None = None, resume: bool = False, overwrite: bool = False) -> SectionResult:
    """Worst-case and random measurement perturbations at every budget, per network and setting."""
    t0 = time.perf_counter()
    config.check()
    folder = _folder(out, "worst_case", config, models, settings, resume, overwrite)
    out = folder.path
    rows = folder.records()
    modality = _modality(settings)
    attack = config.worst_case(modality)
    budgets = config.budgets_for(modality)
    labels = _attack_labels(settings, config)
    _attack_missing(models, settings, labels, config, folder, rows, progress, "worst case",
                    lambda m, label, setting, truths, first: attack(m.network, truths, setting.physics).records(m.name))
    summary = []
    for label in labels:
        for m in models:
            for b in budgets:
                g = [r for r in rows if r["model"] == m.name and float(r["acceleration"]) == float(label)
                     and float(r["budget"]) == float(b)]
                if not g:
                    continue
                s: dict[str, Any] = {"model": m.name, "acceleration": float(label), "budget": float(b),
                                     "images": len(g), "error_unit": g[0]["error_unit"]}
                for k in ("error_clean", "error_pgd", "error_random", "gain_pgd", "gain_random"):
                    s[k] = _ms([r[k] for r in g])[0]
                s["gain_ratio"] = s["gain_pgd"] / s["gain_random"] if s["gain_random"] > 0 else float("nan")
                s["pgd_beats_random"] = sum(r["error_random_max"] is not None  # None: no random draws
                                            and float(r["error_pgd"]) > float(r["error_random_max"]) for r in g)
                summary.append(s)
    unit = summary[0]["error_unit"] if summary else ""
    md = markdown_table(
        ("model", "setting", "ε", "images", "error clean", "error random", "error PGD", "gain random", "gain PGD",
         "PGD / random gain", "PGD > every random draw"),
        [(s["model"], setting_label(s["acceleration"], modality), f"{s['budget']:g}", s["images"],
          fmt(s["error_clean"]), fmt(s["error_random"]), fmt(s["error_pgd"]), fmt(s["gain_random"], 3),
          fmt(s["gain_pgd"], 3), fmt(s["gain_ratio"], 3), f"{s['pgd_beats_random']}/{s['images']}") for s in summary],
        f"**Reconstruction error ({unit}) under measurement perturbations of relative norm ε**")
    figures: list[tuple[str, str, Path]] = []
    if config.figures:
        for label in labels:
            sub = [s for s in summary if s["acceleration"] == float(label)]
            if sub:
                name = setting_label(label, modality)
                p = amplification_curves(sub, out / "figures" / f"worst_case_{label:g}x.png",
                                         title=f"{name}: error against the perturbation budget", error_unit=unit)
                figures.append(("worst_case", f"Error amplification, {name}", p))
    results = {"budgets": list(budgets), "steps": config.steps, "random_draws": config.random_draws,
               "normalization": config.normalization, "summary": summary}
    return _finish("worst_case", out, rows, WORST_CASE_COLUMNS, summary, results, md,
                   "Worst-case measurement perturbations", WORST_CASE_INTRO, figures, t0)


# ----------------------------------------------------------------------------------------------------------------
# 3. False positives
# ----------------------------------------------------------------------------------------------------------------
FALSE_POSITIVE_INTRO = (
    "The smallest measurement perturbation (projected gradient steps within each budget of a ladder, ‖e‖ ≤ ε × the "
    "measurements' norm; CT: × the input noise's norm) that makes a chosen feature (a small disc at a drawn place) "
    "appear in the reconstruction: appearance = 1 − ‖T⊙(x̂(e) − x̂(0) − φ)‖²/‖T⊙φ‖² ≥ threshold. Rate: share of "
    "images where it appears, with its 95% Wilson interval. Honest budget: the relative norm of the feature's own "
    "trace in the measurements; honest appearance: how much of a really measured feature the network shows. A "
    "needed budget well below the honest one means the network makes the feature from less evidence than a real "
    "one leaves.")


def run_false_positive(models: Sequence[LoadedModel], settings: Settings, out: PathLike, config: BeyondConfig,
                       progress: bool | None = None, resume: bool = False,
                       overwrite: bool = False) -> SectionResult:
    """The false-positive attack at every budget of the ladder, per network and setting."""
    t0 = time.perf_counter()
    config.check()
    folder = _folder(out, "false_positive", config, models, settings, resume, overwrite)
    out = folder.path
    rows = folder.records()
    modality = _modality(settings)
    ladder, fixed_budget = config.fp_ladder(modality)
    labels = _attack_labels(settings, config)
    panels: dict[tuple[float, str], dict[str, Any]] = {}  # the first image's attack, for the figure

    def attack(m: LoadedModel, label: float, setting: AttackSetting, truths: Truths, first: bool) -> list[dict]:
        res = config.false_positive(modality, keep_images=config.figures and first)(m.network, truths,
                                                                                    setting.physics)
        if res.images:  # the first image's attack, for the figure
            im = {k: v[0] for k, v in res.images.items() if k != "budget"}
            im["change"] = (im["output"] - im["clean_output"]).abs()
            panels[(label, m.name)] = {"budget": float(res.images["budget"][0]), **im}
        return res.records(m.name)

    _attack_missing(models, settings, labels, config, folder, rows, progress, "false positive", attack)
    curve, summary = [], []
    for label in labels:
        for m in models:
            g = [r for r in rows if r["model"] == m.name and float(r["acceleration"]) == float(label)]
            if not g:
                continue
            for b in ladder:
                gb = [r for r in g if float(r["budget"]) == float(b)]
                k = sum(bool(r["success"]) for r in gb)
                lo, hi = wilson_interval(k, len(gb))
                curve.append({"model": m.name, "acceleration": float(label), "budget": float(b), "images": len(gb),
                              "successes": k, "rate": k / max(1, len(gb)), "ci_low": lo, "ci_high": hi,
                              "appearance": _ms([r["appearance"] for r in gb])[0]})
            per_image: dict[str, list[dict[str, Any]]] = {}
            for r in g:
                per_image.setdefault(r["key"], []).append(r)
            needed = [min((float(r["budget"]) for r in rs if r["success"]), default=math.inf)
                      for rs in per_image.values()]
            honest = [float(rs[0]["honest_budget"]) for rs in per_image.values()]
            fixed = next(c for c in curve if c["model"] == m.name and c["acceleration"] == float(label)
                         and c["budget"] == fixed_budget)
            summary.append({"model": m.name, "acceleration": float(label), "images": len(per_image),
                            "fixed_budget": fixed_budget, "rate": fixed["rate"], "ci_low": fixed["ci_low"],
                            "ci_high": fixed["ci_high"], "needed_budget_median": statistics.median(needed),
                            "never": sum(not math.isfinite(n) for n in needed),
                            "honest_budget_median": statistics.median(honest),
                            "honest_appearance_mean": _ms([rs[0]["honest_appearance"]
                                                           for rs in per_image.values()])[0]})
    md = markdown_table(
        ("model", "setting", "images", f"rate at ε = {fixed_budget:g}", "95% CI", "median needed ε",
         "never appears", "median honest ε", "honest appearance"),
        [(s["model"], setting_label(s["acceleration"], modality), s["images"], f"{100 * s['rate']:.1f}%",
          f"{100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}%",
          fmt(s["needed_budget_median"], 3) if math.isfinite(s["needed_budget_median"])
          else f"> {max(ladder):g}", f"{s['never']}/{s['images']}", fmt(s["honest_budget_median"], 3),
          fmt(s["honest_appearance_mean"], 3)) for s in summary],
        f"**False-positive attack ({config.fp_family}, appearance ≥ {config.fp_threshold:g})**")
    figures: list[tuple[str, str, Path]] = []
    if config.figures:
        for label in labels:
            sub = [c for c in curve if c["acceleration"] == float(label)]
            if not sub:
                continue
            name = setting_label(label, modality)
            p = success_curves(sub, out / "figures" / f"false_positive_{label:g}x.png",
                               title=f"{name}: feature appears, against the budget")
            figures.append(("false_positive", f"False-positive attack rate against the budget, {name}", p))
            panel = []
            for m in models:
                if (label, m.name) not in panels:  # resumed: attack the first image again
                    truths, _ = next(_batches(settings[label][m.name], 1, 1))
                    attack(m, label, settings[label][m.name], truths, True)
                im = panels[(label, m.name)]
                panel.append((f"{m.name}\nε = {im['budget']:g}", im))
            p = image_panels(panel, (("clean_output", "reconstruction", "gray"), ("output", "attacked", "gray"),
                                     ("feature", "target feature φ", "heat"), ("change", "|change|", "heat")),
                             out / "figures" / f"false_positive_examples_{label:g}x.png",
                             title=f"{name}: smallest successful budget (else the largest tried)")
            figures.append(("false_positive", f"False-positive examples, {name}", p))
    results = {"budgets": list(ladder), "fixed_budget": fixed_budget, "steps": config.fp_steps,
               "family": config.fp_family, "threshold": config.fp_threshold, "summary": summary, "curve": curve}
    return _finish("false_positive", out, rows, FALSE_POSITIVE_COLUMNS, summary, results, md,
                   "False positives: making a feature appear", FALSE_POSITIVE_INTRO, figures, t0)


# ----------------------------------------------------------------------------------------------------------------
# 4. Sampling-rate stability
# ----------------------------------------------------------------------------------------------------------------
SAMPLING_COLUMNS: tuple[str, ...] = ("model", "acceleration", "center_fraction", "key", "fname", "slice", "ssim",
                                     "nmse", "psnr", "sse", "energy", "pixels", "max_value")
ZERO_FILLED_ROW = "zero-filled"
SAMPLING_INTRO = (
    "Every network evaluated on the same images over a range of accelerations with the same mask family (centre "
    "fraction 0.32/R: fastMRI's 0.08 at 4x and 0.04 at 8x; seeded random masks of one image are nested, so a lower "
    "acceleration only adds measurements). A stable method improves with more samples (Antun et al., PNAS 2020): a "
    "flag marks an acceleration where the model is worse than at a higher one. Per-volume means (fastMRI metrics).")


def _mask_type(settings: Settings, config: BeyondConfig) -> str:
    if config.mask_type is not None:
        return config.mask_type
    physics = next(iter(next(iter(settings.values())).values())).physics
    if isinstance(physics, MaskFunc):
        for name, cls in MASK_TYPES.items():
            if type(physics) is cls:
                return name
    return "random"


def run_sampling(models: Sequence[LoadedModel], settings: Settings, out: PathLike, config: BeyondConfig,
                 progress: bool | None = None, resume: bool = False, overwrite: bool = False) -> SectionResult:
    """SSIM / NMSE over ``config.sampling_accelerations`` of every MRI network and the zero-filled input, on the
    first setting's images."""
    t0 = time.perf_counter()
    config.check()
    mask_type = _mask_type(settings, config)
    folder = _folder(out, "sampling", config, models, settings, resume, overwrite, {"mask_type": mask_type})
    out = folder.path
    rows = folder.records()
    title = "Sampling-rate stability"
    if _modality(settings) == "ct":
        md = "Not applicable: CT denoisers have no sampling rate.\n"
        return _finish("sampling", out, [], SAMPLING_COLUMNS, [], {"applicable": False}, md, title, SAMPLING_INTRO,
                       [], t0)
    done = {(r["model"], float(r["acceleration"]), r["key"]) for r in rows}
    first = next(iter(settings.values()))
    accs = sorted(float(a) for a in config.sampling_accelerations)
    for acc in accs:
        mask_func = create_mask_func(mask_type, [acc])
        cf = mask_func.center_fractions[0]
        for i, m in enumerate(models):
            batches = list(_batches(first[m.name], config.batch_size, config.sampling_images))
            for truths, max_value in _bar(batches, progress, f"sampling {m.name} {acc:g}x"):
                names = [m.name] + ([ZERO_FILLED_ROW] if i == 0 else [])
                if all((n, acc, k) in done for n in names for k in truths.keys):
                    continue
                with eval_mode(m.model), torch.no_grad():
                    ctx = prepare_measurements(m.network, truths, mask_func, config.seed)
                    truth = ctx.acquisition.crop_image(ctx.target)
                    mv = (max_value.to(truth) if max_value is not None
                          else truth.flatten(1).amax(1))
                    preds = {m.name: clean_output(ctx), ZERO_FILLED_ROW: ctx.measurement.image}
                    for n in names:
                        vm = VolumeMetrics()
                        vm.update(preds[n], truth, truths.fname, truths.slice_num, mv)
                        new = [{"model": n, "acceleration": acc, "center_fraction": cf, "key": k, **r}
                               for k, r in zip(truths.keys, vm.slice_rows) if (n, acc, k) not in done]
                        folder.append(new)
                        rows.extend(new)
                        done.update((n, acc, r["key"]) for r in new)
    order = [m.name for m in models] + [ZERO_FILLED_ROW]
    summary = []
    for n in order:
        per_acc = []
        for acc in accs:
            g = [r for r in rows if r["model"] == n and float(r["acceleration"]) == acc]
            if not g:
                continue
            s = VolumeMetrics.from_rows(g).summary()
            per_acc.append({"model": n, "acceleration": acc, "center_fraction": float(g[0]["center_fraction"]),
                            "images": len(g), "ssim": s["ssim"]["mean"], "nmse": s["nmse"]["mean"],
                            "psnr": s["psnr"]["mean"]})
        tol = config.sampling_tolerance
        for j, s in enumerate(per_acc):  # fewer samples = higher acceleration = later entries
            fewer = per_acc[j + 1:]
            s["flag_ssim"] = any(s["ssim"] < f["ssim"] - tol for f in fewer)
            s["flag_nmse"] = any(s["nmse"] > f["nmse"] * (1 + tol) for f in fewer)
        summary += per_acc
    zf = {s["acceleration"]: s for s in summary if s["model"] == ZERO_FILLED_ROW}
    for s in summary:  # a network that does worse than its own zero-filled input
        z = zf.get(s["acceleration"])
        s["below_zero_filled"] = bool(z and s["model"] != ZERO_FILLED_ROW
                                      and (s["ssim"] < z["ssim"] or s["nmse"] > z["nmse"]))

    def cell(s: Mapping[str, Any]) -> str:
        return (f"{s['ssim']:.4f} / {s['nmse']:.4f}" + (" ⚑" if s["flag_ssim"] or s["flag_nmse"] else "")
                + (" †" if s["below_zero_filled"] else ""))

    md = markdown_table(
        ("model", *(f"{a:g}x" for a in accs)),
        [(n, *(next((cell(s) for s in summary if s["model"] == n and s["acceleration"] == a), "n/a") for a in accs))
         for n in order],
        f"**SSIM / NMSE against acceleration ({mask_type} masks); ⚑ worse than with fewer samples; † SSIM or NMSE "
        "worse than the zero-filled input's**")
    flagged = [{"model": s["model"], "acceleration": s["acceleration"], "ssim": s["flag_ssim"],
                "nmse": s["flag_nmse"]} for s in summary if s["flag_ssim"] or s["flag_nmse"]]
    figures: list[tuple[str, str, Path]] = []
    if config.figures and summary:
        p = sampling_curves(summary, out / "figures" / "sampling_rate.png",
                            title="Reconstruction quality against acceleration (red rings: worse with more samples)")
        figures.append(("sampling", "Sampling-rate stability", p))
    results = {"applicable": True, "mask_type": mask_type, "accelerations": accs, "summary": summary,
               "flagged": flagged, "below_zero_filled": [{"model": s["model"], "acceleration": s["acceleration"]}
                                                         for s in summary if s["below_zero_filled"]],
               "tolerance": config.sampling_tolerance}
    return _finish("sampling", out, rows, SAMPLING_COLUMNS, summary, results, md, title, SAMPLING_INTRO, figures, t0)


# ----------------------------------------------------------------------------------------------------------------
# The audit's section
# ----------------------------------------------------------------------------------------------------------------
RUNNERS = {"hallucinations": run_hallucinations, "worst_case": run_worst_case, "false_positive": run_false_positive,
           "sampling": run_sampling}


def run_beyond_audit(models: Sequence[LoadedModel], settings: Settings, out: PathLike,
                     config: BeyondConfig | None = None, progress: bool | None = None,
                     resume: bool = False) -> BeyondSection:
    """The four sections for the audit, each in ``out/beyond/<section>`` (resumable with the audit).

    Args:
        models: the audited networks (one modality).
        settings: ``{label: {model name: setting}}``, as the audit builds them.
        out: the audit's run folder.
        config: :class:`BeyondConfig` (default :meth:`BeyondConfig.demo`).
    """
    config = config or BeyondConfig.demo()
    config.check()
    base = Path(out) / "beyond"
    results: dict[str, Any] = {}
    md, html_parts, figures, timings = [], [], [], {}
    modality = _modality(settings)
    for name in config.sections:
        if modality == "ct" and name in ("hallucinations", "sampling"):
            continue
        sec = RUNNERS[name](models, settings, base / name, config, progress=progress, resume=resume)
        results[name] = sec.results
        md.append(f"## {sec.name.replace('_', ' ').capitalize()}\n\n{sec.markdown}")
        html_parts.append(sec.html)
        figures += sec.figures
        timings[name] = sec.seconds
    results["timings_s"] = timings
    return BeyondSection(results, "\n".join(md), html_parts, figures, timings)


__all__ = ["SECTIONS", "BeyondConfig", "BeyondSection", "SectionResult", "build_settings", "run_beyond_audit",
           "run_false_positive", "run_hallucinations", "run_sampling", "run_worst_case"]
