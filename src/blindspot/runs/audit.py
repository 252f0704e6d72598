"""The audit: everything the first source document measures, for a set of MRI reconstruction models, in one run.

For each acceleration it computes

* **Table 1** — SSIM, NMSE (mean ± std over volumes) and PSNR of every model, with the zero-filled baseline
  (:func:`blindspot.evaluate.evaluate_models`);
* **Table 2** — the FNAF attack rate of every search (RS, FD, gradient) with its 95% Wilson interval and the mean
  attack loss (:mod:`blindspot.attacks.search`, :func:`blindspot.attacks.records.summarize`), once per criterion:
  the seed's (``L_atk`` reaches a fixed threshold — which also counts the network's own reconstruction error around
  the feature, so a weak network "loses" every feature; the audit reports how often that error alone decides) and
  the scale-free ``recovery`` criterion (the share of the feature's energy the reconstruction keeps);
* **the IP table** — IP acceptance rate and mean IP loss;
* **transferability** — the features found against each model replayed on every other audited model;

and writes into ``RUN_DIR``: ``report.html`` (self-contained, figures embedded), ``results.json`` (attack rates keyed
by model name), ``table1.csv``, ``table2.csv``, ``ip_table.csv``, ``transfer.csv``, ``records.csv`` /
``records.jsonl`` (one row per image, model, acceleration, search and criterion), ``tables.md``,
``features/CRITERION/MODEL/`` (the found features, replayable with ``blindspot fnaf --replay``) and ``figures/``.

Without models it audits the bundled demo models (:func:`bundled_models`) on freshly generated phantoms whose seeds
were used neither for training nor for model selection.

Python API::

    from blindspot.audit import AuditConfig, bundled_models, run_audit
    result = run_audit(bundled_models(), out_dir="runs/audit", config=AuditConfig(phantom_volumes=2))
    print(result.attack_rates["U-Net"]["4x"]["rs"]["attack_rate"])
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from blindspot.errors import BlindspotError, PathLike
from blindspot.attacks.fnaf import CRITERION_TEXT
from blindspot.fileio import append_jsonl, atomic_write_text, read_jsonl, write_csv, write_json

if TYPE_CHECKING:
    from blindspot.lesions import LesionAuditOptions

#: The bundled demo models: (row label, file in ``blindspot/weights``).
BUNDLED: tuple[tuple[str, str], ...] = (
    ("U-Net", "mri_unet.pt"),
    ("FNAF-robust U-Net", "mri_unet_robust.pt"),
    ("I-RIM", "mri_irim.pt"),
)

#: First phantom seed of the audit's default data: training used 1000+, validation (model selection) 0–3.
AUDIT_PHANTOM_SEED = 100


def weights_dir() -> Path:
    """The folder of the bundled weights inside the installed package."""
    return Path(str(resources.files("blindspot") / "weights"))


def bundled_models() -> list[tuple[str, Path]]:
    """``[(label, checkpoint path), …]`` of the bundled demo models (see ``blindspot/weights/README.md``)."""
    out = []
    for name, file in BUNDLED:
        path = weights_dir() / file
        if not path.is_file():
            raise BlindspotError(path, "bundled model is missing from the installation")
        out.append((name, path))
    return out


@dataclass
class AuditConfig:
    """What the audit measures and on which data.

    Attributes:
        accelerations: acceleration factors (each with its standard centre fraction unless given).
        center_fractions: one per acceleration, or ``None`` for 4x → 0.08, 8x → 0.04.
        mask_type: ``"random"`` or ``"equispaced"`` (``None``: the first checkpoint's, else random).
        searches: FNAF searches among ``rs``, ``fd``, ``grad``.
        family: feature family (the seed's ``walk`` by default).
        criteria: the FNAF criteria to attack under, each with its own searches, tables and verdicts: ``seed``
            (attack loss ≥ the seed's threshold) and ``recovery`` (the reconstruction keeps less than half of the
            feature's energy). The first one's features make the figures.
        candidates: RS candidates per image (seed: 11); fd_iterations; grad_steps and grad_init (4 + 6 + 1 = 11 queries).
        transfer: replay each model's features on every other audited model.
        phantom_volumes, phantom_slices, phantom_seed: the phantom data (without ``data``); geometry follows the first
            checkpoint's training phantoms.
        limit: attack / evaluate only the first ``limit`` images.
        lesion_phantoms: without ``boxes``, plant lesions in this many held-out phantom volumes
            (:func:`blindspot.lesions.write_held_out_lesion_phantoms`, in ``out_dir/lesion_phantoms``, the first
            checkpoint's phantom geometry) and add the lesion section on them; 0 for none.
        batch_size: images per attack batch; chunk_size: most candidates per model call.
        seed: the attack's seed.
        device: ``auto``, ``cpu``, ``cuda``…
        figures: write figures (and embed them in the report).
        progress: progress bars (``None``: on a terminal).
    """

    accelerations: tuple[float, ...] = (4.0, 8.0)
    center_fractions: tuple[float, ...] | None = None
    mask_type: str | None = None
    searches: tuple[str, ...] = ("rs", "fd", "grad")
    family: str = "walk"
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
    lesion_phantoms: int = 0
    batch_size: int = 16
    chunk_size: int = 96
    seed: int = 0
    device: str = "auto"
    figures: bool = True
    progress: bool | None = None

    def check(self) -> None:
        from blindspot.attacks.fnaf import CRITERIA
        from blindspot.attacks.search import SEARCHES

        bad = [s for s in self.searches if s not in SEARCHES]
        if bad or not self.searches:
            raise BlindspotError(None, f"unknown search {bad[0] if bad else ''!r}; choose from {', '.join(SEARCHES)}")
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


@dataclass
class AuditResult:
    """What :func:`run_audit` returns (everything is also in ``out_dir``).

    Attributes:
        table1: Table 1 rows (one per model and acceleration; :data:`blindspot.evaluate.TABLE_COLUMNS`).
        table2: Table 2 rows (one per model and acceleration, columns per search).
        ip_table: the IP table's two rows.
        attack_rates: ``{model: {"4x": {search: summary}}}`` (:func:`blindspot.attacks.records.summarize`) under the
            first criterion; ``attack_rates_by_criterion`` holds every criterion's.
        transfer: rows ``{source, target, acceleration, search, transfer_rate, ci_low, ci_high, …}``.
        records: per-image attack records.
        markdown: all tables as Markdown (what the terminal shows).
        report: path of ``report.html``.
        timings: seconds per stage.
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


# ----------------------------------------------------------------------------------------------------------------
def _acc_key(acc: float) -> str:
    return f"{float(acc):g}x"


def _features_dir(out: Path, criterion: str, model: str) -> Path:
    return out / "features" / criterion / _safe(model)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "model"


def load_models(specs: Sequence[tuple[str | None, PathLike]], device: torch.device) -> list:
    """Load ``[(label or None, checkpoint), …]`` as :class:`blindspot.models.loading.LoadedModel` (baseline excluded)."""
    from blindspot.evaluate import load_eval_models

    if not specs:
        raise BlindspotError(None, "no models to audit")
    names = [n for n, _ in specs]
    sources = [str(p) for _, p in specs]
    if any(n is None for n in names):
        names = None if all(n is None for n in names) else [n or Path(p).stem for n, p in specs]
    loaded = load_eval_models(sources, names, device=device, zero_filled=False)
    for m in loaded:
        modality = (m.physics or {}).get("modality")
        if modality not in (None, "mri"):
            raise BlindspotError(m.source, f"was trained for {modality} (its checkpoint's physics), but the audit "
                                           "attacks MRI reconstruction; use `blindspot invariances` for CT denoisers")
    return loaded


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
) -> AuditResult:
    """Audit ``models`` and write the report.

    Args:
        models: ``[(label, checkpoint path), …]``; a ``None`` label takes the architecture's display name.
        out_dir: the run folder.
        data: fastMRI HDF5 / DICOM / image file or folder; ``None`` → phantoms (geometry of the first checkpoint's
            training phantoms, seeds from ``config.phantom_seed``).
        config: :class:`AuditConfig`.
        crop: ``(h, w)`` working size (default: the first checkpoint's crop, else the data's).
        resume: reuse the records of an interrupted run in ``out_dir`` (same settings) instead of recomputing them.
        log: where progress lines go (default: nowhere).
        boxes: lesion bounding boxes (CSV / JSON, :mod:`blindspot.data.lesions`) on the fastMRI ``data`` (required
            with boxes): adds the lesion section (:func:`blindspot.lesions.audit_lesions`, at the data's own image
            size and every acceleration, whatever ``config.limit``): ``results.json["lesions"]``, ``lesions.csv``.
        lesion_options: its rule, box origin and figures (:class:`blindspot.lesions.LesionAuditOptions`).
    """
    from blindspot.attacks.features import FeatureSampler, Region
    from blindspot.attacks.fnaf import FnafObjective
    from blindspot.attacks.records import (RECORD_COLUMNS, group_rows, ip_table, load_features, save_features,
                                           summarize, table2, transfer_rate)
    from blindspot.attacks.search import ReplaySearch, build_search
    from blindspot.data.mri import open_mri_dataset
    from blindspot.data.sample import collate_mri
    from blindspot.evaluate import TABLE_COLUMNS, evaluate_models, load_eval_models, table_markdown
    from blindspot.physics.mri import create_mask_func
    from blindspot.training.distributed import resolve_device

    config = config or AuditConfig()
    config.check()
    if boxes is not None and config.lesion_phantoms:
        raise BlindspotError(boxes, "give lesion boxes or lesion phantoms, not both")
    if boxes is not None:  # lesion boxes are checked against their data before anything runs
        from blindspot.lesions import LesionAuditOptions, open_annotated

        lesion_options = lesion_options or LesionAuditOptions()
        open_annotated(data, boxes, origin=lesion_options.origin)
    say = log or (lambda s: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    audited = load_models(models, device)
    physics0 = audited[0].physics or {}
    mask_type = config.mask_type or physics0.get("mask_type") or "random"
    if crop is None and physics0.get("crop"):
        crop = tuple(int(c) for c in physics0["crop"])
    cfs = list(create_mask_func(mask_type, list(config.accelerations), config.center_fractions).center_fractions)
    geometry = {k: tuple(v) for k, v in (physics0.get("phantom") or {}).items() if k in ("shape", "recon_size")}

    def open_dataset(mask_func) -> Dataset:
        if data is not None:
            ds = open_mri_dataset(data, mask_func, crop)
        else:
            ds = open_mri_dataset(None, mask_func, crop, volumes=config.phantom_volumes, slices=config.phantom_slices,
                                  seed=config.phantom_seed, **geometry)
        if config.limit is not None:
            ds = Subset(ds, range(min(config.limit, len(ds))))
        if len(ds) == 0:
            raise BlindspotError(data, "no images to audit")
        return ds

    settings = {
        "models": [{"name": m.name, "source": m.source, "architecture": m.architecture} for m in audited],
        "data": str(data) if data is not None else f"built-in knee phantoms, {config.phantom_volumes} volumes x "
        f"{config.phantom_slices} slices from seed {config.phantom_seed}",
        "crop": list(crop) if crop else None, "mask_type": mask_type, "center_fractions": cfs,
        **{k: v for k, v in asdict(config).items() if k not in ("device", "progress", "figures")},
    }
    settings["criteria"] = list(config.criteria)
    settings["accelerations"] = [float(a) for a in config.accelerations]
    settings["searches"] = list(config.searches)
    _check_run_dir(out, settings, resume)
    t_load = time.perf_counter()
    timings["load"] = t_load - t0

    # ---- Table 1 ------------------------------------------------------------------------------------------------
    say("Table 1: reconstruction quality")
    eval_models = load_eval_models(["zero-filled"], device=device, zero_filled=False) + audited
    ev = evaluate_models(eval_models, config.accelerations, cfs, open_dataset, mask_type=mask_type,
                         batch_size=config.batch_size, device=device, out_dir=out, resume=True,
                         progress=config.progress)
    t1_rows = ev.rows
    write_csv(out / "table1.csv", t1_rows, TABLE_COLUMNS)
    timings["table1"] = time.perf_counter() - t_load

    # ---- lesions (with boxes): blindspot.lesions on the annotated slices at every acceleration --------------------
    lesion_section = None
    lesion_data = data
    if config.lesion_phantoms:
        from blindspot.lesions import LesionAuditOptions, write_held_out_lesion_phantoms

        say(f"Lesions: planting lesions in {config.lesion_phantoms} held-out phantom volumes")
        lesion_data, boxes = write_held_out_lesion_phantoms(out / "lesion_phantoms", config.lesion_phantoms,
                                                            geometry.get("shape"), geometry.get("recon_size"))
        lesion_options = lesion_options or LesionAuditOptions()
    if boxes is not None:
        from blindspot.lesions import audit_lesions

        say("Lesions: preservation of the annotated lesions")
        lesion_section = audit_lesions(eval_models, lesion_data, boxes, config.accelerations, cfs, mask_type, out,
                                       lesion_options, device=device, figures=config.figures, progress=config.progress)
        timings["lesions"] = lesion_section.seconds

    # ---- attacks -------------------------------------------------------------------------------------------------
    t_att = time.perf_counter()
    objectives = {c: FnafObjective(criterion=c) for c in config.criteria}
    primary = config.criteria[0]
    per = {"rs": dict(n_candidates=config.candidates), "fd": dict(iterations=config.fd_iterations),
           "grad": dict(steps=config.grad_steps, init_candidates=config.grad_init)}

    def common(criterion: str) -> dict[str, Any]:
        return dict(sampler=FeatureSampler(config.family), objective=objectives[criterion], region=Region(),
                    chunk_size=config.chunk_size, seed=config.seed)

    def group_of(r: Mapping[str, Any]) -> tuple[str, float, str, str]:
        return r["model"], float(r["acceleration"]), r["search"], r["criterion"]

    log_path = out / "records.jsonl"
    rows: list[dict[str, Any]] = read_jsonl(log_path) if log_path.exists() else []
    done = {group_of(r) for r in rows}
    datasets: dict[float, Dataset] = {}
    batches: dict[float, list] = {}
    mask_funcs = {}
    for acc, cf in zip(config.accelerations, cfs):
        acc = float(acc)
        mask_funcs[acc] = create_mask_func(mask_type, [acc], [cf])
        datasets[acc] = open_dataset(mask_funcs[acc])
        batches[acc] = list(DataLoader(datasets[acc], batch_size=config.batch_size, shuffle=False,
                                       collate_fn=collate_mri))
    for criterion in config.criteria:
        searches = [build_search(s, **common(criterion), **per[s]) for s in config.searches]
        for acc in batches:
            for m in audited:
                for search in searches:
                    group = (m.name, acc, search.name, criterion)
                    fdir = _features_dir(out, criterion, m.name) / f"{search.name}_{acc:g}x"
                    if group in done and fdir.is_dir():
                        continue
                    rows = [r for r in rows if group_of(r) != group]
                    new = []
                    bar = tqdm(batches[acc], desc=f"{m.name} {search.name.upper()} {acc:g}x {criterion}",
                               unit="batch", leave=False,
                               disable=None if config.progress is None else not config.progress)
                    for bi, batch in enumerate(bar):
                        result = search(m.model, batch, mask_funcs[acc])
                        save_features(fdir / f"batch_{bi:05d}.pt", result, m.name)
                        new.extend(result.rows(m.name))
                    append_jsonl(log_path, new)
                    rows.extend(new)
                    k = sum(bool(r["success"]) for r in new)
                    say(f"  {m.name:>20s} {search.name.upper():>4s} {acc:g}x {criterion:>8s}: {k}/{len(new)} images "
                        "attacked")
    write_csv(out / "records.csv", rows, RECORD_COLUMNS)
    timings["attacks"] = time.perf_counter() - t_att

    # ---- transferability -----------------------------------------------------------------------------------------
    t_tr = time.perf_counter()
    transfer: list[dict[str, Any]] = []
    if config.transfer and len(audited) > 1:
        for criterion in config.criteria:
            for src in audited:
                saved = load_features(_features_dir(out, criterion, src.name))
                for tgt in audited:
                    if tgt is src:
                        continue
                    for search in config.searches:
                        replay = ReplaySearch(saved=saved, source_search=search, **common(criterion))
                        for acc in batches:
                            tgt_rows = []
                            for batch in batches[acc]:
                                res = replay(tgt.model, batch, mask_funcs[acc])
                                if len(res):
                                    tgt_rows.extend(res.rows(tgt.name))
                            src_rows = [r for r in rows if group_of(r) == (src.name, acc, search, criterion)]
                            tr = transfer_rate(src_rows, tgt_rows, criterion=criterion)
                            transfer.append({"source": src.name, "target": tgt.name, "acceleration": acc,
                                             "search": search, **tr})
        write_csv(out / "transfer.csv", transfer)
    timings["transfer"] = time.perf_counter() - t_tr

    # ---- tables --------------------------------------------------------------------------------------------------
    order = {(m.name, float(a), s): i for i, (m, a, s) in enumerate(
        (m, a, s) for a in config.accelerations for m in audited for s in config.searches)}
    t2_rows: list[dict[str, Any]] = []
    ip_rows: list[dict[str, Any]] = []
    headline: list[dict[str, Any]] = []
    rates_by: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    md_t2: dict[str, str] = {}
    md_ip: dict[str, str] = {}
    md_tr: dict[str, str] = {}
    md_parts = ["## Table 1: reconstruction quality (per-volume mean ± std)\n\n" + table_markdown(t1_rows)]
    for criterion in config.criteria:
        groups = group_rows(r for r in rows if r["criterion"] == criterion)
        summaries = {k: summarize(groups[k]) for k in sorted(groups, key=lambda k: order.get(k, 1 << 30))}
        c_t2_rows, c_t2_md = table2(summaries)
        if criterion == "seed":
            c_t2_md += "\n" + saturation_markdown(summaries)
        c_ip_rows, _ = ip_table(summaries)
        t2_rows += [{"criterion": criterion, **r} for r in c_t2_rows]
        ip_rows += [{"criterion": criterion, **r} for r in c_ip_rows]
        rates = rates_by.setdefault(criterion, {})
        for (m, a, s), sm in summaries.items():
            rates.setdefault(m, {}).setdefault(_acc_key(a), {})[s] = sm
        headline += [{"criterion": criterion, **h} for h in robustness_headline(t1_rows, rates)]
        md_t2[criterion], md_ip[criterion] = c_t2_md, ip_markdown(summaries)
        md_tr[criterion] = transfer_markdown([t for t in transfer if t["criterion"] == criterion])
        title = f"{criterion} criterion — {CRITERION_TEXT[criterion]}"
        md_parts += [f"## Table 2: FNAF attack rates, {title}\n\n" + md_t2[criterion],
                     f"## Information preservation, {criterion} criterion\n\n" + md_ip[criterion]]
        if transfer:
            md_parts.append(f"## Transferability, {criterion} criterion\n\n" + md_tr[criterion])
    if headline:
        md_parts.append("## FNAF-robust training against the seed's claim\n\n" + headline_markdown(headline))
    write_csv(out / "table2.csv", t2_rows)
    write_csv(out / "ip_table.csv", ip_rows)
    if lesion_section is not None:
        md_parts.append(lesion_section.markdown)
    md = "\n".join(md_parts)
    atomic_write_text(out / "tables.md", md)

    # ---- figures and report --------------------------------------------------------------------------------------
    t_fig = time.perf_counter()
    figures: list[tuple[str, str, Path]] = []
    if config.figures:
        figures = _figures(out, audited, [r for r in rows if r["criterion"] == primary], batches, mask_funcs,
                           objectives[primary], config)
    timings["figures"] = time.perf_counter() - t_fig
    timings["total"] = time.perf_counter() - t0
    results = {
        "settings": settings,
        "criteria": list(config.criteria),
        "attack_rates": rates_by[primary],
        "attack_rates_by_criterion": rates_by,
        "table1": t1_rows,
        "table2": t2_rows,
        "ip_table": ip_rows,
        "transfer": transfer,
        "headline": headline,
        "timings_s": timings,
    }
    if lesion_section is not None:
        results["lesions"] = lesion_section.results
        figures = [*figures, *lesion_section.figures]
    write_json(out / "results.json", results)
    from blindspot.report.html import render_audit_report

    report = render_audit_report(out / "report.html", results, md_tables={
        "table1": table_markdown(t1_rows), "table2": md_t2, "ip": md_ip, "transfer": md_tr}, figures=figures)
    return AuditResult(t1_rows, t2_rows, ip_rows, rates_by[primary], transfer, rows, md, report, timings, rates_by)


def _check_run_dir(out: Path, settings: dict[str, Any], resume: bool) -> None:
    from blindspot.fileio import read_json

    run_json = out / "audit.json"
    if (out / "records.jsonl").exists() or (out / "slices.jsonl").exists():
        if not resume:
            raise BlindspotError(out, "already holds an audit; pass --resume to continue it or choose another --out")
        if run_json.exists():
            old = read_json(run_json).get("settings", {})
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            if diff:
                raise BlindspotError(run_json, f"the audit was made with other settings ({', '.join(diff)}); "
                                               "resume with the same ones or choose another --out")
    write_json(run_json, {"command": "audit", "settings": settings})


def transfer_markdown(transfer: Sequence[dict[str, Any]]) -> str:
    """Transfer rates as one source × target matrix per acceleration; a cell lists each search's rate (%) and, in
    brackets, how many of the source's successful features were replayed."""
    if not transfer:
        return ""
    parts = []
    for acc in dict.fromkeys(float(t["acceleration"]) for t in transfer):
        block = [t for t in transfer if float(t["acceleration"]) == acc]
        names = list(dict.fromkeys(n for t in block for n in (t["source"], t["target"])))
        sources = [n for n in names if any(t["source"] == n for t in block)]
        targets = [n for n in names if any(t["target"] == n for t in block)]
        lines = [f"**{acc:g}×** (source → target: share of the source's successful features that also fool the "
                 "target)", "", "| source \\ target | " + " | ".join(targets) + " |", "|" + " --- |" * (len(targets) + 1)]
        for src in sources:
            cells = []
            for tgt in targets:
                items = [t for t in block if t["source"] == src and t["target"] == tgt]
                cells.append("—" if not items else " · ".join(
                    f"{t['search'].upper()} " + ("—" if not math.isfinite(t["transfer_rate"])
                                                 else f"{100 * t['transfer_rate']:.0f}% ({t['n_matched']})")
                    for t in items))
            lines.append(f"| {src} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def saturation_markdown(summaries: dict) -> str:
    """How much of the seed criterion's verdict the network's own error explains: per model, acceleration and search,
    the share of images whose found feature's neighbourhood already reaches the threshold without the feature."""
    lines = ["**How much the network's own error decides the seed criterion** (share of images whose found feature's "
             "neighbourhood T holds, without any feature, reconstruction error at the threshold — there every "
             "feature counts as lost)", "",
             "| model | acceleration | search | error alone at threshold (%) | mean error alone | mean L_atk | "
             "threshold |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (m, a, s), sm in summaries.items():
        sat = sm.get("baseline_saturation", float("nan"))
        thr = sm.get("loss_threshold", float("nan"))
        lines.append(f"| {m} | {a:g}× | {s.upper()} | {'—' if not math.isfinite(sat) else f'{100 * sat:.1f}'} | "
                     f"{sm.get('mean_baseline_loss', float('nan')):.5f} | {sm['mean_attack_loss']:.5f} | {thr:.5f} |")
    return "\n".join(lines) + "\n"


def ip_markdown(summaries: dict) -> str:
    """The IP table in long form: one row per model, acceleration and search (acceptance %, mean IP loss)."""
    lines = ["| model | acceleration | search | Acceptance Rate (%) | IP Loss (MSE) | images |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (m, a, s), sm in summaries.items():
        lines.append(f"| {m} | {a:g}× | {s.upper()} | {100 * sm['ip_acceptance']:.2f} | {sm['mean_ip_loss']:.5f} | "
                     f"{sm['n']} |")
    return "\n".join(lines) + "\n"


#: The seed's claim for FNAF-robust training: the attack rate falls to at most this fraction of the standard model's,
#: at a quality cost of at most ``SSIM_TOLERANCE`` in SSIM and ``NMSE_TOLERANCE`` (relative) in NMSE. Both checks
#: are one-sided: a robust model with better SSIM or NMSE than the standard one meets them.
RATE_FRACTION, SSIM_TOLERANCE, NMSE_TOLERANCE = 1 / 3, 0.01, 0.05


def headline_markdown(headline: Sequence[Mapping[str, Any]]) -> str:
    """:func:`robustness_headline` rows as one table: per criterion and acceleration, each search's attack rate of the
    standard and the robust model with ✓ where it meets :data:`RATE_FRACTION`, and the SSIM / NMSE changes."""
    searches = list(dict.fromkeys(k[: -len("_ratio")] for h in headline for k in h if k.endswith("_ratio")))
    lines = [f"(✓: the robust model's attack rate is at most a third of the standard one's; SSIM may be at most "
             f"{SSIM_TOLERANCE} lower and NMSE at most {100 * NMSE_TOLERANCE:.0f}% higher)", "",
             "| models | criterion | acceleration | " + " | ".join(s.upper() for s in searches)
             + " | SSIM change | NMSE change |", "|" + " --- |" * (len(searches) + 5)]
    for h in headline:
        cells = [("—" if f"{s}_rate" not in h else
                  f"{100 * h[f'{s}_rate']:.1f}% → {100 * h[f'{s}_robust_rate']:.1f}% {'✓' if h[f'{s}_meets'] else '✗'}")
                 for s in searches]
        dssim, dnmse = h.get("ssim_diff", float("nan")), h.get("nmse_rel_change", float("nan"))
        lines.append(f"| {h['robust']} vs {h['model']} | {h.get('criterion', '')} | {h['acceleration']} | "
                     + " | ".join(cells) + f" | {dssim:+.4f} {'✓' if h.get('ssim_within') else '✗'} | "
                     f"{100 * dnmse:+.1f}% {'✓' if h.get('nmse_within') else '✗'} |")
    return "\n".join(lines) + "\n"


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
def _figures(out: Path, audited, rows, batches, mask_funcs, objective, config) -> list[tuple[str, str, Path]]:
    """The report's figures: the qualitative grid, loss-vs-IP scatters, location heat-maps and the worst cases."""
    from blindspot.attacks.features import Region
    from blindspot.attacks.records import group_rows
    from blindspot.report.fnaf_figures import example_panels, location_heatmap, loss_vs_ip_scatter
    from blindspot.report.html import qualitative_grid

    figs = out / "figures"
    made: list[tuple[str, str, Path]] = []
    groups = group_rows(rows)
    first_search = config.searches[0]
    any_batch = next(iter(batches.values()))[0]
    shape = tuple(any_batch.target.shape[-2:])
    box = Region().box(*shape)
    for acc in batches:
        # qualitative grid: the first model's clearest failed and successful attack, replayed on every model
        # (a search without a failed attack lends the row to the next search that has one)
        src = audited[0]
        picks: dict[str, tuple[str, dict]] = {}
        for search in config.searches:
            g = groups.get((src.name, acc, search), [])
            succ = [r for r in g if r["success"]]
            fail = [r for r in g if r["accepted"] and not r["success"]]
            if fail and "failed attack" not in picks:
                picks["failed attack"] = (search, min(fail, key=lambda r: float(r["attack_loss"])))
            if succ and "successful attack" not in picks:
                picks["successful attack"] = (search, max(succ, key=lambda r: float(r["attack_loss"])))
        picks = {k: picks[k] for k in ("failed attack", "successful attack") if k in picks}
        if picks:
            panels = {}
            for label, (search, rec) in picks.items():
                (panel,) = _replay_images(out, audited, src.name, search, acc, [rec], batches[acc], mask_funcs[acc],
                                          objective)
                panels[f"{label} ({search.upper()})"] = panel
            path = qualitative_grid(panels, [m.name for m in audited], figs / f"qualitative_{acc:g}x.png",
                                    title=f"{acc:g}×: features found against {src.name}, reconstructed by every model")
            made.append(("qualitative", f"Qualitative results, {acc:g}×", path))
        for m in audited:
            g = groups.get((m.name, acc, first_search), [])
            if not g:
                continue
            tag = f"{_safe(m.name)}_{first_search}_{acc:g}x"
            thr = float(g[0]["loss_threshold"])
            p = loss_vs_ip_scatter(g, figs / f"loss_vs_ip_{tag}.png", thr, float(g[0]["ip_threshold"]),
                                   title=f"{m.name} {first_search.upper()} {acc:g}×")
            made.append(("scatter", f"{m.name}, {first_search.upper()} {acc:g}×: attack loss vs IP loss", p))
            p = location_heatmap(g, shape, figs / f"locations_{tag}.png", region_box=box,
                                 title=f"{m.name} {first_search.upper()} {acc:g}×")
            made.append(("heatmap", f"{m.name}, {first_search.upper()} {acc:g}×: where attacks succeed", p))
            worst = sorted([r for r in g if r["success"]], key=lambda r: -float(r["attack_loss"]))[:3]
            if worst:
                imgs = _replay_images(out, [m], m.name, first_search, acc, worst, batches[acc], mask_funcs[acc],
                                      objective)
                ex = {f"worst {i + 1}": d[m.name] for i, d in enumerate(imgs)}
                p = example_panels(ex, figs / f"worst_{tag}.png", title=f"{m.name} {first_search.upper()} {acc:g}×: "
                                                                         "worst cases")
                made.append(("worst", f"{m.name}, {first_search.upper()} {acc:g}×: worst cases", p))
    return made


def _replay_images(out: Path, models, source: str, search: str, acc: float, picks, batches, mask_func, objective):
    """For each picked record (found against ``source``), the images of every model on that feature:
    ``[{model name: example dict (fnaf.search.example_images)}, …]``."""
    from blindspot.attacks.fnaf import subset_batch
    from blindspot.attacks.records import load_features
    from blindspot.attacks.search import ReplaySearch, example_images

    saved = load_features(_features_dir(out, objective.criterion, source) / f"{search}_{acc:g}x")
    result_panels = []
    for rec in picks:
        batch = next(b for b in batches if rec["key"] in b.keys)
        sub = subset_batch(batch, [batch.keys.index(rec["key"])])
        panel = {}
        for m in models:
            res = ReplaySearch(saved=saved, source_search=search, objective=objective)(m.model, sub, mask_func)
            panel[m.name] = example_images(m.model, sub, mask_func, res, objective, [0])[0]
        result_panels.append(panel)
    return result_panels
