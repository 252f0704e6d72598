"""The audit: everything the source documents measure, for a set of MRI reconstruction networks or CT denoisers.

For each setting (MRI acceleration, or CT dose) it computes

* **Table 1** — image quality. MRI: SSIM, NMSE (mean ± std over volumes) and PSNR of every network, with the
  zero-filled baseline (:func:`blindspot.runs.evaluate.evaluate_models`). CT: RMSE in HU and PSNR / SSIM in the abdomen
  and lung windows against the full-dose image, for every denoiser and for the low-dose input itself, on the same
  simulated (or real) low-dose inputs the attacks use;
* **Table 2** — the FNAF attack rate of every search (RS, FD, gradient) with its 95% Wilson interval and the mean
  attack loss (:mod:`blindspot.attacks.search`, :func:`blindspot.attacks.records.summarize`), once per criterion:
  the seed's (``L_atk`` reaches a fixed threshold — which also counts the network's own error around the feature, so a
  weak network "loses" every feature; the audit reports how often that error alone decides) and the scale-free
  ``recovery`` criterion (the share of the feature's energy the output keeps). On CT the features are small
  low-contrast discs in HU added to the full-dose image, and IP asks that they be detectable above the low-dose
  input's noise (:mod:`blindspot.physics.acquisition`);
* **the IP table** — IP acceptance rate and the mean IP statistic;
* **transferability** — the features found against each network replayed on every other audited network;

and writes into ``RUN_DIR``: ``report.html`` (self-contained, figures embedded), ``results.json`` (attack rates keyed
by model name), ``table1.csv``, ``table2.csv``, ``ip_table.csv``, ``transfer.csv``, ``records.csv`` /
``records.jsonl`` (one row per image, model, setting, search and criterion), ``tables.md``,
``features/CRITERION/MODEL/`` (the found features, replayable with ``blindspot fnaf --replay``) and ``figures/``.

Without models it audits the bundled demo networks of a modality (:func:`bundled_models`) on freshly generated
phantoms whose seeds were used neither for training nor for model selection.

Python API::

    from blindspot.runs.audit import AuditConfig, bundled_models, run_audit
    result = run_audit(bundled_models(), out_dir="runs/audit", config=AuditConfig(phantom_volumes=2))
    print(result.attack_rates["U-Net"]["4x"]["rs"]["attack_rate"])
    ct = run_audit(bundled_models("ct"), out_dir="runs/audit-ct", config=AuditConfig(phantom_volumes=2))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Subset

from blindspot.attacks.fnaf import CRITERIA, CRITERION_TEXT, FnafObjective, as_truths, subset_batch
from blindspot.attacks.invariance import InvarianceConfig
from blindspot.attacks.records import (RECORD_COLUMNS, group_rows, ip_table, load_features, setting_label,
                                       summarize, table2, transfer_rate)
from blindspot.attacks.search import ReplaySearch, check_searches, example_images
from blindspot.data.mri import open_mri_dataset
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.runs.evaluate import TABLE_COLUMNS, evaluate_models, load_eval_models
from blindspot.fileio import atomic_write_text, write_csv, write_json
from blindspot.runs.lesions import LesionAuditOptions, audit_lesions, open_annotated, write_held_out_lesion_phantoms
from blindspot.metrics import mean_std
from blindspot.models.adapters import eval_mode
from blindspot.models.loading import DISPLAY_NAMES, LoadedModel, load_model, weights_dir
from blindspot.physics.ct import WINDOWS
from blindspot.physics.mri import create_mask_func
from blindspot.report.fnaf_figures import example_panels, location_heatmap, loss_vs_ip_scatter
from blindspot.report.html import qualitative_grid, render_audit_report
from blindspot.report.tables import (CT_WINDOWS, ct_table1_markdown, headline_markdown, invariance_markdown,
                                     ip_long_markdown, saturation_markdown, table1_markdown, table2_markdown,
                                     transfer_matrix_markdown)
from blindspot.runs.fnaf import (AttackSetting, FnafConfig, attack_setting, ct_acquisition, ct_settings,
                                 phantom_geometry_of, record_id, replay_setting, tag)
from blindspot.runs.folder import RunFolder
from blindspot.runs.beyond import BeyondConfig, BeyondSection, run_beyond_audit
from blindspot.runs.ranks import RankRecords, gather_ordered, join, leave, open_folder
from blindspot.runs.images import CTImageSet
from blindspot.runs.invariances import run_invariances
from blindspot.training.ct import slice_metrics
from blindspot.training.distributed import resolve_device

#: The bundled demo networks per modality: (row label, file in ``blindspot/weights``).
BUNDLED: dict[str, tuple[tuple[str, str], ...]] = {
    "mri": (("U-Net", "mri_unet.pt"), ("FNAF-robust U-Net", "mri_unet_robust.pt"), ("I-RIM", "mri_irim.pt")),
    "ct": (("CNN-10", "cnn10.pt"), ("RED-CNN", "redcnn.pt"), ("WGAN-VGG", "wganvgg.pt")),
}

#: The audit's invariance runs weigh the distance reward as ``blindspot invariances`` does by default.
INVARIANCE_ALPHA = 0.01

#: First phantom seed of the audit's default data: training used 1000+, validation (model selection) 0–3 (MRI);
#: the CT denoisers were trained and selected on patients 0–11.
AUDIT_PHANTOM_SEED = 100

CT_TABLE_COLUMNS: tuple[str, ...] = (
    "model", "dose", "images", "rmse_hu_mean", "rmse_hu_std",
    *[f"{k}_{w}_{s}" for w in CT_WINDOWS for k in ("psnr", "ssim") for s in ("mean", "std")],
)  # fmt: skip


def bundled_models(modality: str = "mri") -> list[tuple[str, Path]]:
    """``[(label, checkpoint path), …]`` of the bundled demo networks of ``modality`` (``mri`` or ``ct``)."""
    if modality not in BUNDLED:
        raise BlindspotError(None, f"unknown modality {modality!r}; choose mri or ct")
    out = []
    for name, file in BUNDLED[modality]:
        path = weights_dir() / file
        if not path.is_file():
            raise BlindspotError(path, "bundled model is missing from the installation")
        out.append((name, path))
    return out


@dataclass
class AuditConfig:
    """What the audit measures and on which data.

    Attributes:
        accelerations: MRI acceleration factors (each with its standard centre fraction unless given).
        center_fractions: one per acceleration, or ``None`` for 4x → 0.08, 8x → 0.04.
        mask_type: ``"random"`` or ``"equispaced"`` (``None``: the first checkpoint's, else random).
        dose: CT: the dose fraction of the denoisers' input (``None``: the first checkpoint's).
        ct_size: CT phantoms: image size (``None``: the first checkpoint's training size).
        searches: FNAF searches among ``rs``, ``fd``, ``grad``.
        family: feature family (``None``: the seed's ``walk`` for MRI, low-contrast discs in HU for CT).
        criteria: the FNAF criteria to attack under, each with its own searches, tables and verdicts: ``seed``
            (attack loss ≥ the seed's threshold) and ``recovery`` (the output keeps less than half of the feature's
            energy). The first one's features make the figures.
        candidates: RS candidates per image (seed: 11); fd_iterations; grad_steps and grad_init (4 + 6 + 1 = 11 queries).
        transfer: replay each model's features on every other audited model.
        phantom_volumes, phantom_slices, phantom_seed: the phantom data (without ``data``): MRI volumes × slices
            (geometry of the first checkpoint's training phantoms); CT ``phantom_volumes × phantom_slices`` slices.
        limit: attack / evaluate only the first ``limit`` images.
        skip_bad: CT series: leave out member files that are not readable CT images (and their partner slices),
            each printed on stderr and listed in ``run.json`` (``skipped``), instead of stopping at the first.
        lesion_phantoms: MRI, without ``boxes``: plant lesions in this many held-out phantom volumes
            (:func:`blindspot.runs.lesions.write_held_out_lesion_phantoms`, in ``out_dir/lesion_phantoms``) and add the
            lesion section on them; 0 for none.
        invariance_images, invariance_iterations: CT: image-domain invariances (DESIGN.md §1.3, MSE distance,
            α = :data:`INVARIANCE_ALPHA`, as ``blindspot invariances``)
            of each denoiser on the first ``invariance_images`` low-dose inputs, with a short budget of Adam
            iterations (the source document runs 3000); 0 images for none. Written to ``invariances/MODEL/`` and
            included in the report.
        batch_size: images per attack batch; chunk_size: most candidates per model call.
        seed: the attack's seed (it also keys a simulated CT input's noise).
        device: ``auto``, ``cpu``, ``cuda``…
        figures: write figures (and embed them in the report).
        progress: progress bars (``None``: on a terminal).
        beyond: add the sections beyond the seeds (:func:`blindspot.runs.beyond.run_beyond_audit`: null-space
            hallucination maps, worst-case and random measurement perturbations, false-positive features,
            sampling-rate stability), with ``beyond_config`` (``None``: :meth:`BeyondConfig.demo`).
    """

    accelerations: tuple[float, ...] = (4.0, 8.0)
    center_fractions: tuple[float, ...] | None = None
    mask_type: str | None = None
    dose: float | None = None
    ct_size: int | None = None
    searches: tuple[str, ...] = ("rs", "fd", "grad")
    family: str | None = None
    criteria: tuple[str, ...] = ("seed", "recovery")
    candidates: int = 11
    fd_iterations: int = 2
    grad_steps: int = 6
    grad_init: int = 4
    transfer: bool = True
    phantom_volumes: int = 6
    phantom_slices: int = 6
    phantom_seed: int = AUDIT_PHANTOM_SEED
    limit: int | None = None
    skip_bad: bool = False
    lesion_phantoms: int = 0
    invariance_images: int = 1
    invariance_iterations: int = 200
    batch_size: int = 16
    chunk_size: int = 96
    seed: int = 0
    device: str = "auto"
    figures: bool = True
    progress: bool | None = None
    beyond: bool = True
    beyond_config: BeyondConfig | None = None

    def check(self) -> None:
        check_searches(self.searches)
        bad = [c for c in self.criteria if c not in CRITERIA]
        if bad or not self.criteria or len(set(self.criteria)) != len(self.criteria):
            raise BlindspotError(None, f"criteria must be distinct names among {', '.join(CRITERIA)}, got "
                                       f"{', '.join(self.criteria) or 'none'}")
        if self.center_fractions is not None and len(self.center_fractions) != len(self.accelerations):
            raise BlindspotError(None, "give one centre fraction per acceleration")
        if self.lesion_phantoms < 0:
            raise BlindspotError(None, "lesion-phantoms must be >= 0")
        for name in ("candidates", "grad_init", "batch_size", "chunk_size", "phantom_volumes", "phantom_slices"):
            if getattr(self, name) < 1:
                raise BlindspotError(None, f"{name.replace('_', '-')} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise BlindspotError(None, "limit must be >= 1")

    def fnaf(self, criterion: str) -> FnafConfig:
        """The FNAF searches' configuration under one criterion."""
        return FnafConfig(searches=self.searches, family=self.family, criterion=criterion, candidates=self.candidates,
                          fd_iterations=self.fd_iterations, grad_steps=self.grad_steps, grad_init=self.grad_init,
                          batch_size=self.batch_size, chunk_size=self.chunk_size, seed=self.seed)


@dataclass
class AuditResult:
    """What :func:`run_audit` returns (everything is also in ``out_dir``).

    Attributes:
        table1: Table 1 rows (MRI: one per model and acceleration, :data:`blindspot.runs.evaluate.TABLE_COLUMNS`; CT: one
            per model and the low-dose input, :data:`CT_TABLE_COLUMNS`).
        table2: Table 2 rows (one per model and setting, columns per search).
        ip_table: the IP table's two rows.
        attack_rates: ``{model: {"4x": {search: summary}}}`` (:func:`blindspot.attacks.records.summarize`) under the
            first criterion; ``attack_rates_by_criterion`` holds every criterion's.
        transfer: rows ``{source, target, acceleration, search, transfer_rate, ci_low, ci_high, …}``.
        records: per-image attack records.
        markdown: all tables as Markdown (what the terminal shows).
        report: path of ``report.html``.
        timings: seconds per stage.
        modality: ``mri`` or ``ct``.
        main: this process is rank 0 (or the only one): the one that wrote the tables and prints them. The other
            ranks of a ``torchrun`` job get empty tables and print nothing.
    """

    table1: list[dict[str, Any]]
    table2: list[dict[str, Any]]
    ip_table: list[dict[str, Any]]
    attack_rates: dict[str, dict[str, dict[str, dict[str, Any]]]]
    transfer: list[dict[str, Any]]
    records: list[dict[str, Any]]
    markdown: str
    report: Path
    timings: dict[str, float] = field(default_factory=dict)
    attack_rates_by_criterion: dict[str, dict[str, Any]] = field(default_factory=dict)
    modality: str = "mri"
    main: bool = True


# ----------------------------------------------------------------------------------------------------------------
def _acc_key(acc: float) -> str:
    return f"{float(acc):g}x"


def _features_dir(out: Path, criterion: str, model: str) -> Path:
    return out / "features" / criterion / _safe(model)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "model"


def load_models(specs: Sequence[tuple[str | None, PathLike]], device: torch.device, architecture: str | None = None,
                hparams: dict[str, Any] | None = None) -> list[LoadedModel]:
    """Load ``[(label or None, checkpoint), …]``: MRI networks (the zero-filled baseline excluded) or CT denoisers,
    all of one modality; ``architecture`` / ``hparams`` for bare state dicts (hyper-parameters are inferred from the
    weights' shapes where they can be)."""
    if not specs:
        raise BlindspotError(None, "no models to audit")
    first = load_model(specs[0][1], device, architecture=architecture, hparams=hparams, warn=False)
    if first.modality == "ct":
        out = []
        for label, spec in specs:
            m = load_model(spec, device, architecture=architecture, hparams=hparams, name=label, warn=False)
            if m.modality != "ct":
                raise BlindspotError(spec, f"is an {m.modality.upper()} network; audit networks of one modality")
            if label is None:
                m.name = DISPLAY_NAMES.get(m.architecture, m.architecture)
            out.append(m)
        names = [m.name for m in out]
        if len(set(names)) != len(names):
            raise BlindspotError(None, "two rows would share a name; give --names")
        return out
    names = [n for n, _ in specs]
    sources = [str(p) for _, p in specs]
    if any(n is None for n in names):
        names = None if all(n is None for n in names) else [n or Path(p).stem for n, p in specs]
    return load_eval_models(sources, names, device=device, zero_filled=False, arch=architecture, hparams=hparams)


# ----------------------------------------------------------------------------------------------------------------
# Table 1 for CT: image quality on the attack's own inputs
# ----------------------------------------------------------------------------------------------------------------
def ct_quality_table(models: Sequence[LoadedModel], settings: Mapping[str, AttackSetting], seed: int,
                     low_dose_label: str = "Low-dose input") -> list[dict[str, Any]]:
    """RMSE (HU) and windowed PSNR / SSIM (:data:`CT_WINDOWS`, data range 1) against the full-dose truth, mean ± std
    over images, for the low-dose input and every denoiser, on the inputs the attacks see (the same seeded noise);
    on real scanner slices over their field of view only (:attr:`blindspot.data.ldct.CTBatch.field`)."""
    per: dict[str, dict[str, list[float]]] = {}
    objective = FnafObjective(reference=True, fuse_reference=False)
    dose = None
    for i, m in enumerate(models):
        setting = settings[m.name]
        dose = setting.physics.dose
        with eval_mode(m.model), torch.no_grad():
            for batch in setting.loader(16):
                ctx = objective.prepare(m.network, batch, setting.physics, seed=seed)
                pred = ctx.stats.invert(ctx.clean_output)
                if not torch.isfinite(pred).all():
                    raise BlindspotError(m.source, f"output contains NaN or Inf on {ctx.keys[0]}")
                pairs = [(m.name, pred)] + ([(low_dose_label, ctx.measurement.image)] if i == 0 else [])
                field = getattr(batch, "field", None)  # real scanner slices: metrics inside the field of view only
                field = None if field is None else field.to(pred.device)
                for name, img in pairs:
                    vals = per.setdefault(name, {})
                    for w in CT_WINDOWS:
                        sm = slice_metrics(img, ctx.target, WINDOWS[w], field)  # RMSE (HU) does not depend on w
                        for key, v in (("rmse_hu", sm["rmse_hu"]), (f"psnr_{w}", sm["psnr"]), (f"ssim_{w}", sm["ssim"])):
                            vals.setdefault(key, []).extend(v.tolist())
    rows = []
    for name in [low_dose_label] + [m.name for m in models]:
        row: dict[str, Any] = {"model": name, "dose": dose, "images": len(per[name]["rmse_hu"]) // len(CT_WINDOWS)}
        for k, v in per[name].items():
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std(v)
        rows.append({c: row.get(c) for c in CT_TABLE_COLUMNS})
    return rows


# ----------------------------------------------------------------------------------------------------------------
def run_audit(
    models: Sequence[tuple[str | None, PathLike]],
    out_dir: PathLike,
    data: PathLike | None = None,
    config: AuditConfig | None = None,
    crop: tuple[int, int] | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    boxes: PathLike | None = None,
    lesion_options: LesionAuditOptions | None = None,
    architecture: str | None = None,
    hparams: dict[str, Any] | None = None,
    coil_maps: str | None = "full",
) -> AuditResult:
    """Audit ``models`` (MRI reconstruction networks or CT denoisers, one modality) and write the report.

    Args:
        models: ``[(label, checkpoint path or bundled name), …]``; a ``None`` label takes the architecture's name.
        out_dir: the run folder.
        data: MRI: fastMRI HDF5 / DICOM / image file or folder; CT: a folder in the LDCT layout; ``None`` → phantoms
            (MRI: geometry of the first checkpoint's training phantoms; seeds from ``config.phantom_seed``).
        config: :class:`AuditConfig`.
        crop: MRI: ``(h, w)`` working size (default: the first checkpoint's crop, else the data's).
        resume: reuse the records of an interrupted run in ``out_dir`` (same settings) instead of recomputing them.
        log: where progress lines go (default: nowhere).
        boxes: MRI: lesion bounding boxes (CSV / JSON, :mod:`blindspot.data.lesions`) on the fastMRI ``data``: adds
            the lesion section (:func:`blindspot.runs.lesions.audit_lesions`, at the data's own image size and every
            acceleration, whatever ``config.limit``): ``results.json["lesions"]``, ``lesions.csv``.
        lesion_options: its rule, box origin and figures (:class:`blindspot.runs.lesions.LesionAuditOptions`).
        architecture, hparams: for bare state dicts (e.g. fastMRI's U-Net or VarNet weights).
        coil_maps: MRI multi-coil data: the coil-sensitivity estimator of the attacks' multi-coil acquisition
            (``full``, ``lowres``, ``espirit``; see :mod:`blindspot.physics.coils`).
    """
    config = config or AuditConfig()
    config.check()
    if boxes is not None and config.lesion_phantoms:
        raise BlindspotError(boxes, "give lesion boxes or lesion phantoms, not both")
    if boxes is not None:  # lesion boxes are checked against their data before anything runs
        lesion_options = lesion_options or LesionAuditOptions()
        open_annotated(data, boxes, origin=lesion_options.origin)
    say = log or (lambda s: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    audited = load_models(models, device, architecture, hparams)
    modality = audited[0].modality
    if modality == "ct" and (boxes is not None or config.lesion_phantoms):
        raise BlindspotError(boxes, "the lesion section is for MRI networks")
    physics0 = audited[0].physics or {}
    settings_json: dict[str, Any] = {
        "modality": modality,
        "models": [{"name": m.name, "source": m.source, "architecture": m.architecture} for m in audited],
        **{k: v for k, v in asdict(config).items() if k not in ("device", "progress", "figures", "beyond_config",
                                                                 "skip_bad")},
    }
    settings_json.update(criteria=list(config.criteria), searches=list(config.searches),
                         accelerations=[float(a) for a in config.accelerations])
    lesion_section = None
    if modality == "mri":
        if config.skip_bad:
            raise BlindspotError("--skip-bad", "is for CT series (LDCT layout); these are MRI networks")
        mask_type = config.mask_type or physics0.get("mask_type") or "random"
        if crop is None and physics0.get("crop"):
            crop = tuple(int(c) for c in physics0["crop"])
        cfs = list(create_mask_func(mask_type, list(config.accelerations), config.center_fractions).center_fractions)
        geometry = phantom_geometry_of(audited[0])
        settings_json.update(data=str(data) if data is not None else f"built-in knee phantoms, {config.phantom_volumes}"
                             f" volumes x {config.phantom_slices} slices from seed {config.phantom_seed}",
                             crop=list(crop) if crop else None, mask_type=mask_type, center_fractions=cfs,
                             coil_maps=coil_maps if geometry.get("challenge") == "multicoil" or data else None)
    else:
        n_ct = config.phantom_volumes * config.phantom_slices
        settings_json.update(data=str(data) if data is not None else f"built-in CT phantoms, {n_ct} slices from seed "
                             f"{config.phantom_seed}")
        (ct_base,) = ct_settings(audited[0], data, config.dose, n_ct, config.ct_size, config.phantom_seed, config.limit,
                                 skip_bad=config.skip_bad)
        if ct_base.skipped:
            settings_json["skipped"] = ct_base.skipped
    # under torchrun: rank 0 alone writes Table 1, lesions, tables and the report; the attacks and the transfer are
    # shared by batches (blindspot.runs.ranks)
    ranks = join(device)
    if not ranks.is_main:
        say = lambda s: None  # noqa: E731
    folder = open_folder(ranks, lambda writer: RunFolder(out_dir, "audit", settings_json, resume=resume,
                                                         inputs=[data], writer=writer))
    log = RankRecords(folder, ranks)
    out = folder.path
    timings["load"] = time.perf_counter() - t0

    # ---- data, and Table 1 ---------------------------------------------------------------------------------------
    t_load = time.perf_counter()
    settings: dict[float, dict[str, AttackSetting]] = {}  # setting label → model name → its setting
    if modality == "mri":

        wants_kspace = any(m.network.needs_measurements for m in audited) or None

        def open_dataset(mask_func) -> Dataset:
            if data is not None:
                ds = open_mri_dataset(data, mask_func, crop, coil_maps=coil_maps, kspace=wants_kspace)
            else:
                ds = open_mri_dataset(None, mask_func, crop, volumes=config.phantom_volumes,
                                      slices=config.phantom_slices, seed=config.phantom_seed, coil_maps=coil_maps,
                                      kspace=wants_kspace, **geometry)
            if config.limit is not None:
                ds = Subset(ds, range(min(config.limit, len(ds))))
            if len(ds) == 0:
                raise BlindspotError(data, "no images to audit")
            return ds

        say("Table 1: reconstruction quality")
        eval_models = load_eval_models(["zero-filled"], device=device, zero_filled=False) + audited
        t1_rows, t1_md = [], ""
        if ranks.is_main:
            ev = evaluate_models(eval_models, config.accelerations, cfs, open_dataset, mask_type=mask_type,
                                 batch_size=config.batch_size, device=device, out_dir=out, resume=True,
                                 progress=config.progress)
            t1_rows, t1_md = ev.rows, table1_markdown(ev.rows, seed=True)
            write_csv(out / "table1.csv", t1_rows, TABLE_COLUMNS)
        for acc, cf in zip(config.accelerations, cfs):
            mask_func = create_mask_func(mask_type, [acc], [cf])
            shared = AttackSetting(float(acc), mask_func, open_dataset(mask_func), collate_mri, "mri")
            shared = shared.materialised(config.batch_size)
            settings[float(acc)] = {m.name: shared for m in audited}
        maps0 = next(iter(settings.values()))[audited[0].name].batch_list[0].sens_maps
        settings_json["acquisition"] = {"coils": 1 if maps0 is None else int(maps0.shape[1]),
                                        "coil_maps": None if maps0 is None else coil_maps}
    else:
        base = ct_base.materialised(config.batch_size)
        truths0 = as_truths(base.batch_list[0])
        first = truths0.image[:1] if truths0.field is None else truths0.image[:1][truths0.field[:1]]  # in-field pixels
        settings[base.label] = {m.name: base.with_physics(ct_acquisition(m, base.physics.dose,
                                                                          tuple(truths0.image.shape[-2:]), first))
                                for m in audited}
        say("Table 1: denoising quality")
        t1_rows, t1_md = [], ""
        if ranks.is_main:
            t1_rows = ct_quality_table(audited, settings[base.label], config.seed)
            t1_md = ct_table1_markdown(t1_rows)
            write_csv(out / "table1.csv", t1_rows, CT_TABLE_COLUMNS)
    timings["table1"] = time.perf_counter() - t_load

    # ---- lesions (MRI, with boxes): blindspot.runs.lesions on the annotated slices at every acceleration ------------------
    if config.lesion_phantoms and ranks.is_main:
        say(f"Lesions: planting lesions in {config.lesion_phantoms} held-out phantom volumes")
        data_l, boxes = write_held_out_lesion_phantoms(out / "lesion_phantoms", config.lesion_phantoms,
                                                       geometry.get("shape"), geometry.get("recon_size"))
        lesion_options = lesion_options or LesionAuditOptions()
    else:
        data_l = data
    if boxes is not None and ranks.is_main:
        say("Lesions: preservation of the annotated lesions")
        lesion_section = audit_lesions(eval_models, data_l, boxes, config.accelerations, cfs, mask_type, out,
                                       lesion_options, device=device, figures=config.figures, progress=config.progress)
        timings["lesions"] = lesion_section.seconds

    # ---- attacks -------------------------------------------------------------------------------------------------
    t_att = time.perf_counter()
    primary = config.criteria[0]

    def group_of(r: Mapping[str, Any]) -> tuple[str, float, str, str]:
        return r["model"], float(r["acceleration"]), r["search"], r["criterion"]

    # every (criterion, search) of a model and setting in one pass over the batches: one clean reference per image
    # (runs.fnaf.attack_setting); under torchrun each rank takes its batches (runs.ranks), records merged in order
    jobs = [(c, s) for c in config.criteria for s in config.fnaf(c).build(modality, c)]
    group_order = {(m.name, label, s, c): i for i, (c, label, m, s) in enumerate(
        (c, label, m, s) for c in config.criteria for label in settings for m in audited for s in config.searches)}
    rows: list[dict[str, Any]] = log.rows()
    for li, (label, per_model) in enumerate(settings.items()):
        for mi, m in enumerate(audited):
            searches = [s for _, s in jobs]

            def record(search, batch, result, new, bi, li=li, mi=mi, searches=searches):
                j = next(i for i, s in enumerate(searches) if s is search)
                log.append(new, [(li, mi, bi, j, batch.keys.index(r["key"])) for r in new])

            attack_setting(m.network, searches, per_model[m.name], config.batch_size,
                           [_features_dir(out, c, m.name) for c, _ in jobs],
                           {record_id(r) for r in rows if r["model"] == m.name}, record,
                           progress=config.progress if ranks.is_main else False, desc=f"{m.name} attacks",
                           mine=log.mine)
    rows = log.merge(sort_key=lambda r: group_order.get(group_of(r), len(group_order)))
    for m_name, label, search_name, criterion in group_order:
        new = [r for r in rows if group_of(r) == (m_name, label, search_name, criterion)]
        k = sum(bool(r["success"]) for r in new)
        say(f"  {m_name:>20s} {search_name.upper():>4s} {setting_label(label, modality):>9s} "
            f"{criterion:>8s}: {k}/{len(new)} images attacked")
    if ranks.is_main:
        write_csv(out / "records.csv", rows, RECORD_COLUMNS)
    timings["attacks"] = time.perf_counter() - t_att

    # ---- transferability -----------------------------------------------------------------------------------------
    # every source's features replayed on a target in shared model calls over one pass (one clean reference per image)
    t_tr = time.perf_counter()
    transfer: list[dict[str, Any]] = []
    if config.transfer and len(audited) > 1:
        saved = {(c, src.name): load_features(_features_dir(out, c, src.name)) for c in config.criteria
                 for src in audited}
        replayed: dict[tuple[str, str, str, str, float], list[dict[str, Any]]] = {}
        for tgt in audited:
            rjobs = [(c, src, search) for c in config.criteria for src in audited if src is not tgt
                     for search in config.searches]
            replays = [ReplaySearch(saved=saved[(c, src.name)], source_search=search,
                                    **config.fnaf(c).common(modality)) for c, src, search in rjobs]
            for label, per_model in settings.items():
                pairs = replay_setting(tgt.network, replays, per_model[tgt.name], config.batch_size,
                                       progress=config.progress if ranks.is_main else False,
                                       desc=f"transfer →{tgt.name}", mine=log.mine)
                for (j, _, _), r in gather_ordered(ranks, pairs):
                    c, src, search = rjobs[j]
                    replayed.setdefault((c, src.name, tgt.name, search, label), []).append(r)
        for criterion in config.criteria:
            for src in audited:
                for tgt in audited:
                    if tgt is src:
                        continue
                    for search in config.searches:
                        for label in settings:
                            tgt_rows = replayed.get((criterion, src.name, tgt.name, search, label), [])
                            src_rows = [r for r in rows if group_of(r) == (src.name, label, search, criterion)]
                            tr = transfer_rate(src_rows, tgt_rows, criterion=criterion)
                            transfer.append({"source": src.name, "target": tgt.name, "acceleration": label,
                                             "search": search, **tr})
        if ranks.is_main:
            write_csv(out / "transfer.csv", transfer)
    timings["transfer"] = time.perf_counter() - t_tr

    # ---- invariances (CT): what each denoiser ignores ------------------------------------------------------------
    t_inv = time.perf_counter()
    invariance_sections: list[str] = []
    invariance_summary: dict[str, Any] = {}
    if modality == "ct" and config.invariance_images > 0:
        say("Invariances: image-domain optimisation on the low-dose inputs")
        label, per_model = next(iter(settings.items()))
        truths = [as_truths(b) for b in next(iter(per_model.values())).batch_list]
        low = torch.cat([t.observed if t.observed is not None else t.image for t in truths])[: config.invariance_images]
        keys = [k for t in truths for k in t.keys][: config.invariance_images]
        inv_config = InvarianceConfig(alpha=INVARIANCE_ALPHA, iterations=config.invariance_iterations,
                                      seed=config.seed, min_iterations=config.invariance_iterations,
                                      progress=bool(config.progress))
        for m in audited:
            physics = per_model[m.name].physics
            images = CTImageSet.from_tensor(low.cpu(), keys, physics.dose, physics.norm)
            run = run_invariances(m, out / "invariances" / _safe(m.name), images, inv_config, "mse",
                                  figures=1 if config.figures else 0, device=device, resume=resume)
            agg = run.summary["aggregate"]
            invariance_summary[m.name] = {k: agg[k]["mean"] for k in ("mean_abs_change", "output_mean_abs_change",
                                                                      "change_ratio") if k in agg}
            invariance_sections.append((run.out / "section.html").read_text(encoding="utf-8").replace(
                "<h2>Invariances</h2>", f"<h3>{m.name}</h3>", 1))
    timings["invariances"] = time.perf_counter() - t_inv
    if not ranks.is_main:  # rank 0 writes the tables, figures and report
        leave(ranks)
        return AuditResult([], [], [], {}, transfer, rows, "", out / "report.html", timings, {}, modality,
                           main=False)

    # ---- beyond the seeds: hallucinations, measurement attacks, sampling rate (blindspot.runs.beyond) -----------
    t_bey = time.perf_counter()
    beyond: BeyondSection | None = None
    if config.beyond:
        say("Beyond the seeds: hallucination maps, measurement attacks, sampling rate")
        beyond = run_beyond_audit(audited, settings, out, config.beyond_config or BeyondConfig.demo(
            seed=config.seed, figures=config.figures, batch_size=config.batch_size),
            progress=config.progress, resume=resume)
    timings["beyond"] = time.perf_counter() - t_bey
    if beyond is not None:
        timings.update({f"beyond_{k}": v for k, v in beyond.timings.items()})

    # ---- tables --------------------------------------------------------------------------------------------------
    order = {(m.name, float(a), s): i for i, (m, a, s) in enumerate(
        (m, a, s) for a in settings for m in audited for s in config.searches)}
    t2_rows: list[dict[str, Any]] = []
    ip_rows: list[dict[str, Any]] = []
    headline: list[dict[str, Any]] = []
    rates_by: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    md_t2: dict[str, str] = {}
    md_ip: dict[str, str] = {}
    md_tr: dict[str, str] = {}
    quality = "reconstruction quality (per-volume mean ± std)" if modality == "mri" else \
        "denoising quality (per-image mean ± std)"
    md_parts = [f"## Table 1: {quality}\n\n" + t1_md]
    for criterion in config.criteria:
        groups = group_rows(r for r in rows if r["criterion"] == criterion)
        summaries = {k: summarize(groups[k]) for k in sorted(groups, key=lambda k: order.get(k, 1 << 30))}
        c_t2_rows, c_t2_md = table2(summaries), table2_markdown(summaries)
        if criterion == "seed":
            c_t2_md += "\n" + saturation_markdown(summaries)
        c_ip_rows = ip_table(summaries)
        t2_rows += [{"criterion": criterion, **r} for r in c_t2_rows]
        ip_rows += [{"criterion": criterion, **r} for r in c_ip_rows]
        rates = rates_by.setdefault(criterion, {})
        for (m, a, s), sm in summaries.items():
            rates.setdefault(m, {}).setdefault(_acc_key(a), {})[s] = sm
        if modality == "mri":
            headline += [{"criterion": criterion, **h} for h in robustness_headline(t1_rows, rates)]
        md_t2[criterion], md_ip[criterion] = c_t2_md, ip_long_markdown(summaries)
        md_tr[criterion] = transfer_matrix_markdown([t for t in transfer if t["criterion"] == criterion], modality)
        title = f"{criterion} criterion — {CRITERION_TEXT[criterion]}"
        md_parts += [f"## Table 2: FNAF attack rates, {title}\n\n" + md_t2[criterion],
                     f"## Information preservation, {criterion} criterion\n\n" + md_ip[criterion]]
        if transfer:
            md_parts.append(f"## Transferability, {criterion} criterion\n\n" + md_tr[criterion])
    if headline:
        md_parts.append("## FNAF-robust training against the seed's claim\n\n" + headline_markdown(
            headline, RATE_FRACTION, SSIM_TOLERANCE, NMSE_TOLERANCE))
    write_csv(out / "table2.csv", t2_rows)
    write_csv(out / "ip_table.csv", ip_rows)
    if invariance_summary:
        md_parts.append(f"## Invariances (image domain, MSE, α = {INVARIANCE_ALPHA:g})\n\n"
                        + invariance_markdown(invariance_summary))
    if lesion_section is not None:
        md_parts.append(lesion_section.markdown)
    if beyond is not None:
        md_parts.append(beyond.markdown)
    md = "\n".join(md_parts)
    atomic_write_text(out / "tables.md", md)

    # ---- figures and report --------------------------------------------------------------------------------------
    t_fig = time.perf_counter()
    figures: list[tuple[str, str, Path]] = []
    if config.figures:
        figures = _figures(out, audited, [r for r in rows if r["criterion"] == primary], settings,
                           config.fnaf(primary).objective(), config, modality)
    timings["figures"] = time.perf_counter() - t_fig
    timings["total"] = time.perf_counter() - t0
    results = {
        "settings": settings_json,
        "modality": modality,
        "criteria": list(config.criteria),
        "attack_rates": rates_by[primary],
        "attack_rates_by_criterion": rates_by,
        "table1": t1_rows,
        "table2": t2_rows,
        "ip_table": ip_rows,
        "transfer": transfer,
        "headline": headline,
        "invariances": invariance_summary,
        "timings_s": timings,
    }
    if lesion_section is not None:
        results["lesions"] = lesion_section.results
        figures = [*figures, *lesion_section.figures]
    if beyond is not None:
        results["beyond"] = {k: v for k, v in beyond.results.items() if k != "timings_s"}  # timings: timings_s
    write_json(out / "results.json", results)
    report = render_audit_report(out / "report.html", results, md_tables={
        "table1": t1_md, "table2": md_t2, "ip": md_ip, "transfer": md_tr}, figures=figures,
        sections=invariance_sections, extra_sections=beyond.html_sections if beyond else ())
    leave(ranks)
    return AuditResult(t1_rows, t2_rows, ip_rows, rates_by[primary], transfer, rows, md, report, timings, rates_by,
                       modality)


#: The seed's claim for FNAF-robust training: the attack rate falls to at most this fraction of the standard model's,
#: at a quality cost of at most ``SSIM_TOLERANCE`` in SSIM and ``NMSE_TOLERANCE`` (relative) in NMSE. Both checks
#: are one-sided: a robust model with better SSIM or NMSE than the standard one meets them.
RATE_FRACTION, SSIM_TOLERANCE, NMSE_TOLERANCE = 1 / 3, 0.01, 0.05


def robustness_headline(table1: Sequence[dict[str, Any]], rates: dict) -> list[dict[str, Any]]:
    """For every pair (model, its FNAF-robust version) — labels ``X`` and ``FNAF-robust X`` — and acceleration:
    attack-rate ratios per search and the SSIM / NMSE differences, each checked against the seed's claim
    (:data:`RATE_FRACTION`, :data:`SSIM_TOLERANCE`, :data:`NMSE_TOLERANCE`): ``{search}_meets``, ``ssim_within``,
    ``nmse_within``, and ``searches_met`` / ``searches_not_met``."""
    out = []
    for robust in rates:
        if not robust.startswith("FNAF-robust "):
            continue
        base = robust[len("FNAF-robust "):]
        if base not in rates:
            continue
        for acc_key, per in rates[robust].items():
            t1 = {r["model"]: r for r in table1 if _acc_key(r["acceleration"]) == acc_key}
            row: dict[str, Any] = {"model": base, "robust": robust, "acceleration": acc_key}
            if base in t1 and robust in t1:
                row["ssim_diff"] = t1[robust]["ssim_mean"] - t1[base]["ssim_mean"]
                row["nmse_rel_change"] = t1[robust]["nmse_mean"] / t1[base]["nmse_mean"] - 1.0
                row["ssim_within"] = row["ssim_diff"] >= -SSIM_TOLERANCE
                row["nmse_within"] = row["nmse_rel_change"] <= NMSE_TOLERANCE
            met, not_met = [], []
            for s, sm in per.items():
                b = rates[base].get(acc_key, {}).get(s)
                if b is None:
                    continue
                row[f"{s}_rate"] = b["attack_rate"]
                row[f"{s}_robust_rate"] = sm["attack_rate"]
                row[f"{s}_ratio"] = sm["attack_rate"] / b["attack_rate"] if b["attack_rate"] > 0 else float("nan")
                bound = RATE_FRACTION * b["attack_rate"] + 1e-12  # 12/36 against 36/36 is a third
                row[f"{s}_meets"] = b["attack_rate"] > 0 and sm["attack_rate"] <= bound
                (met if row[f"{s}_meets"] else not_met).append(s)
            row["searches_met"], row["searches_not_met"] = met, not_met
            out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
def _figures(out: Path, audited: Sequence[LoadedModel], rows: Sequence[dict[str, Any]],
             settings: Mapping[float, Mapping[str, AttackSetting]], objective: FnafObjective, config: AuditConfig,
             modality: str) -> list[tuple[str, str, Path]]:
    """The report's figures: the qualitative grid, loss-vs-IP scatters, location heat-maps and the worst cases."""
    figs = out / "figures"
    made: list[tuple[str, str, Path]] = []
    groups = group_rows(rows)
    first_search = config.searches[0]
    for label, per_model in settings.items():
        name = setting_label(label, modality)
        any_setting = next(iter(per_model.values()))
        shape = tuple(as_truths(any_setting.batch_list[0]).image.shape[-2:])
        box = config.fnaf(objective.criterion).region_of().box(*shape)
        # qualitative grid: the first model's clearest failed and successful attack, replayed on every model
        # (a search without a failed attack lends the row to the next search that has one)
        src = audited[0]
        picks: dict[str, tuple[str, dict]] = {}
        for search in config.searches:
            g = groups.get((src.name, label, search), [])
            succ = [r for r in g if r["success"]]
            fail = [r for r in g if r["accepted"] and not r["success"]]
            if fail and "failed attack" not in picks:
                picks["failed attack"] = (search, min(fail, key=lambda r: float(r["attack_loss"])))
            if succ and "successful attack" not in picks:
                picks["successful attack"] = (search, max(succ, key=lambda r: float(r["attack_loss"])))
        picks = {k: picks[k] for k in ("failed attack", "successful attack") if k in picks}
        if picks:
            panels = {}
            for what, (search, rec) in picks.items():
                (panel,) = _replay_images(out, audited, src.name, search, label, [rec], per_model, objective, config)
                panels[f"{what} ({search.upper()})"] = panel
            path = qualitative_grid(panels, [m.name for m in audited], figs / f"qualitative_{label:g}x.png",
                                    title=f"{name}: features found against {src.name}, output of every model",
                                    input_label="zero-filled input" if modality == "mri" else "low-dose input")
            made.append(("qualitative", f"Qualitative results, {name}", path))
        for m in audited:
            g = groups.get((m.name, label, first_search), [])
            if not g:
                continue
            t = f"{_safe(m.name)}_{first_search}_{label:g}x"
            p = loss_vs_ip_scatter(g, figs / f"loss_vs_ip_{t}.png", float(g[0]["loss_threshold"]),
                                   float(g[0]["ip_threshold"]), title=f"{m.name} {first_search.upper()} {name}")
            made.append(("scatter", f"{m.name}, {first_search.upper()} {name}: attack loss vs IP statistic", p))
            p = location_heatmap(g, shape, figs / f"locations_{t}.png", region_box=box,
                                 title=f"{m.name} {first_search.upper()} {name}")
            made.append(("heatmap", f"{m.name}, {first_search.upper()} {name}: where attacks succeed", p))
            worst = sorted([r for r in g if r["success"]], key=lambda r: -float(r["attack_loss"]))[:3]
            if worst:
                imgs = _replay_images(out, [m], m.name, first_search, label, worst, per_model, objective, config)
                ex = {f"worst {i + 1}": d[m.name] for i, d in enumerate(imgs)}
                p = example_panels(ex, figs / f"worst_{t}.png", title=f"{m.name} {first_search.upper()} {name}: "
                                                                       "worst cases")
                made.append(("worst", f"{m.name}, {first_search.upper()} {name}: worst cases", p))
    return made


def _replay_images(out: Path, models: Sequence[LoadedModel], source: str, search: str, label: float, picks,
                   per_model: Mapping[str, AttackSetting], objective: FnafObjective, config: AuditConfig):
    """For each picked record (found against ``source``), the images of every model on that feature:
    ``[{model name: example dict (blindspot.attacks.search.example_images)}, …]``."""
    saved = load_features(_features_dir(out, objective.criterion, source) / tag(search, label))
    panels = []
    for rec in picks:
        batch = next(b for b in per_model[source].batch_list if rec["key"] in b.keys)
        sub = subset_batch(batch, [batch.keys.index(rec["key"])])
        panel = {}
        for m in models:
            physics = per_model[m.name].physics
            res = ReplaySearch(saved=saved, source_search=search, objective=objective, seed=config.seed,
                               sampler=config.fnaf(objective.criterion).sampler(per_model[m.name].modality))(
                m.network, sub, physics)
            panel[m.name] = example_images(m.network, sub, physics, res, objective, [0], seed=config.seed)[0]
        panels.append(panel)
    return panels
