"""``blindspot fnaf``: the FNAF attack on an MRI reconstruction model, with resumable per-image records.

Writes into ``--out RUN_DIR``:

* ``run.json`` — the settings (a resumed run must use the same ones);
* ``records.jsonl`` — one JSON line per (image, acceleration, search), appended and synced after every batch (the
  durable log that ``--resume`` reads); ``records.csv`` — the same rows, rewritten atomically after every batch;
* ``features/<search>_<R>x/batch_NNNNN.pt`` (+ ``.json``) — the found features, for ``--replay`` on another model;
* ``examples/<search>_<R>x.pt`` — images of the clearest failed and successful attacks;
* ``summary.json``, ``tables.md``, ``table2.csv``, ``ip_table.csv`` — attack rates with 95% intervals, mean attack
  loss, IP acceptance and IP loss (and transfer rates when replaying);
* ``figures/`` — location heat-maps, attack-loss-vs-IP scatter plots and example panels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindspot.errors import BlindspotError

#: Settings that change the records; a resumed run must match them.
_RECORD_SETTINGS = (
    "model", "arch", "name", "data", "search", "replay", "accelerations", "center_fractions", "mask_type", "crop",
    "phantom_shape", "phantom_recon_size", "phantom_slices", "phantom_volumes", "phantom_seed",
    "family", "criterion", "region", "region_fraction", "candidates", "fd_iterations", "fd_restarts",
    "grad_steps", "grad_step_size", "grad_init", "dilation", "loss_threshold", "threshold_pixels", "recovery_threshold",
    "ip_threshold", "limit", "seed",
)  # fmt: skip


def register(subparsers) -> None:
    from blindspot.attacks.features import CENTER_FRACTION, FAMILIES
    from blindspot.attacks.fnaf import CRITERIA
    from blindspot.attacks.search import SEARCHES
    from blindspot.commands.train_mri import add_data_arguments

    p = subparsers.add_parser(
        "fnaf",
        help="FNAF attack: find small features that a reconstruction network drops",
        description="Search for false-negative adversarial features (FNAF) against an MRI reconstruction model and "
        "report attack rates, IP acceptance and figures. Results go to --out and can be resumed.",
    )
    p.add_argument("--model", required=True,
                   help="checkpoint file, or a registered model name (e.g. zero-filled) for an untrained baseline")
    p.add_argument("--arch", help="architecture of a bare state-dict checkpoint (e.g. unet)")
    p.add_argument("--name", help="the model's label in records and tables (default: from the checkpoint's path)")
    p.add_argument("--data", help="fastMRI HDF5, DICOM, PNG or NumPy file or folder (default: built-in phantoms)")
    p.add_argument("--search", nargs="+", choices=SEARCHES,
                   help="searches to run (default rs; with --replay: the saved searches)")
    p.add_argument("--replay", metavar="RUN_DIR",
                   help="replay the features found by another run on this model (transferability) instead of searching")
    g = add_data_arguments(p)  # --accelerations, --center-fractions, --mask-type, --crop, phantom geometry
    g.add_argument("--phantom-volumes", type=int, default=4, help="phantom volumes to attack (default 4)")
    g.add_argument("--phantom-seed", type=int, default=0, help="first phantom volume seed (default 0: the "
                   "validation phantoms of train/evaluate)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--family", choices=FAMILIES, default="walk", help="feature family (default: the seed's walk)")
    p.add_argument("--criterion", choices=CRITERIA, default="seed",
                   help="what is maximised and counted: seed (L_atk >= threshold) or recovery (kept energy < 0.5)")
    p.add_argument("--region", default="center",
                   help="where features go: center (the central crop), foreground, or a .npy boolean mask file")
    p.add_argument("--region-fraction", type=float, default=CENTER_FRACTION,
                   help="side of the central crop as a fraction of the image (default 120/320)")
    p.add_argument("--candidates", type=int, default=11, help="RS candidates per image (default 11, as the seed)")
    p.add_argument("--fd-iterations", type=int, default=2)
    p.add_argument("--fd-restarts", type=int, default=1)
    p.add_argument("--grad-steps", type=int, default=6)
    p.add_argument("--grad-step-size", type=float, default=0.2,
                   help="signed step as a fraction of the allowed maximum intensity")
    p.add_argument("--grad-init", type=int, default=4,
                   help="random features the gradient search picks its start from "
                   "(default 4: with 6 steps, the same 11 queries as RS)")
    p.add_argument("--dilation", type=int, default=3, help="pixels by which the support is dilated into T")
    p.add_argument("--loss-threshold", type=float, default=1e-3,
                   help="the seed's threshold on L_atk (whole-image MSE) for 320x320 images")
    p.add_argument("--threshold-pixels", type=int, default=320 * 320,
                   help="image size in pixels at which --loss-threshold applies; other sizes scale it by "
                   "threshold-pixels/(h*w) so the same lost energy counts alike (0: no scaling)")
    p.add_argument("--recovery-threshold", type=float, default=0.5)
    p.add_argument("--ip-threshold", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4, help="images per batch")
    p.add_argument("--chunk-size", type=int, default=64, help="most candidates per model call (bounds memory)")
    p.add_argument("--limit", type=int, help="attack only the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR, skipping images already recorded")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------------------------
def _load_model(spec: str, arch: str | None, device: torch.device) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """A checkpoint file, or a registered model name (no weights: baselines such as ``zero-filled``)."""
    from blindspot.models.checkpoint import load_checkpoint
    from blindspot.models.registry import build_model, model_names

    path = Path(spec)
    if path.exists():
        ck = load_checkpoint(path, map_location=device, architecture=arch)
        generic = path.stem in ("best", "last", "model", "checkpoint")  # name it after its run folder
        label = path.parent.name if generic and path.parent.name else path.stem
        return ck.model.to(device).eval(), label, dict(ck.physics or {})
    if spec in model_names():
        model = build_model(spec)
        if any(True for _ in model.parameters()):
            print(f"blindspot fnaf: note: {spec!r} has no weights here (an untrained baseline)", file=sys.stderr)
        return model.to(device).eval(), spec, {}
    raise BlindspotError(spec, f"neither a checkpoint file nor a known model ({', '.join(model_names())})")


def _region(args) -> "Region":
    from blindspot.attacks.features import Region

    if args.region in ("center", "foreground"):
        return Region(args.region, fraction=args.region_fraction)
    path = Path(args.region)
    if not path.is_file():
        raise BlindspotError(path, "region must be center, foreground or a .npy mask file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise BlindspotError(path, f"not a readable .npy mask ({err})") from None
    if arr.ndim != 2 or not arr.any():
        raise BlindspotError(path, f"region mask must be a non-empty 2-D array, got shape {arr.shape}")
    return Region("mask", mask=torch.from_numpy(arr != 0))


def _settings(args) -> dict[str, Any]:
    out = {}
    for k in _RECORD_SETTINGS:
        v = getattr(args, k, None)
        out[k] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _check_run_dir(out: Path, settings: dict[str, Any], resume: bool) -> None:
    from blindspot.fileio import read_json, write_json

    run_json = out / "run.json"
    has_records = (out / "records.jsonl").exists()
    if has_records and not resume:
        raise BlindspotError(out, "already holds FNAF records; pass --resume to continue it or choose another --out")
    if run_json.exists() and resume:
        old = read_json(run_json).get("settings", {})
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            raise BlindspotError(run_json, f"the run was made with other settings ({', '.join(diff)}); "
                                           "resume with the same ones or choose another --out")
        return
    write_json(run_json, {"command": "fnaf", "settings": settings})


class _Examples:
    """The clearest failed and successful attack per (search, acceleration), with their images, kept on disk."""

    def __init__(self, path: Path, criterion: str):
        self.path = path
        self.criterion = criterion
        self.data: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                self.data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged example file is only a figure: rebuild it
                self.data = {}

    def _value(self, row: dict[str, Any]) -> float:
        if self.criterion == "recovery":
            return 1.0 - float(row["recovery"])
        return float(row["attack_loss"])

    def offer(self, rows: list[dict[str, Any]], fetch) -> None:
        """``fetch(indices) -> list of image dicts`` re-runs the chosen rows (only when an example improves)."""
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
        images = fetch([picks[n] for n in names])
        for n, img in zip(names, images):
            img["value"] = self._value(rows[picks[n]])
            self.data[n] = img
        import io

        from blindspot.fileio import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(self.data, buf)
        atomic_write_bytes(self.path, buf.getvalue())


def _repair_log(path: Path) -> None:
    """Drop a partial last line left by a crash mid-append, so later appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _tag(search_name: str, acc: float) -> str:
    return f"{search_name}_{acc:g}x"


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from blindspot.attacks.features import FeatureSampler
    from blindspot.attacks.fnaf import FnafObjective
    from blindspot.attacks.records import RECORD_COLUMNS, load_features, save_features, summarize
    from blindspot.attacks.search import ReplaySearch, build_search, example_images
    from blindspot.commands.train_mri import phantom_options
    from blindspot.training.distributed import resolve_device
    from blindspot.data.mri import open_mri_dataset
    from blindspot.data.sample import collate_mri
    from blindspot.fileio import append_jsonl, read_jsonl, write_csv
    from blindspot.physics.mri import create_mask_func

    for name in ("batch_size", "chunk_size", "candidates", "grad_init"):
        if getattr(args, name) < 1:
            raise BlindspotError(None, f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise BlindspotError(None, "--limit must be >= 1")
    if args.center_fractions and len(args.center_fractions) != len(args.accelerations):
        raise BlindspotError(None, "give one --center-fractions value per acceleration")
    out = Path(args.out)
    settings = _settings(args)
    _check_run_dir(out, settings, args.resume)
    device = resolve_device(args.device)
    model, model_name, ck_physics = _load_model(args.model, args.arch, device)
    model_name = args.name or model_name
    mask_type = args.mask_type or ck_physics.get("mask_type") or "random"
    crop = tuple(args.crop) if args.crop else (tuple(ck_physics["crop"]) if ck_physics.get("crop") else None)

    objective = FnafObjective(
        criterion=args.criterion,
        dilation=args.dilation,
        loss_threshold=args.loss_threshold,
        threshold_pixels=args.threshold_pixels or None,
        recovery_threshold=args.recovery_threshold,
        ip_threshold=args.ip_threshold,
    )
    common = dict(sampler=FeatureSampler(args.family), objective=objective, region=_region(args),
                  chunk_size=args.chunk_size, seed=args.seed)
    source_rows: list[dict[str, Any]] = []
    if args.replay:
        src = Path(args.replay)
        saved = load_features(src / "features" if (src / "features").is_dir() else src)
        names = args.search or saved.searches()
        searches = [ReplaySearch(saved=saved, source_search=s, **common) for s in names]
        source_rows = read_jsonl(src / "records.jsonl")
    else:
        per = {
            "rs": dict(n_candidates=args.candidates),
            "fd": dict(iterations=args.fd_iterations, restarts=args.fd_restarts),
            "grad": dict(steps=args.grad_steps, step_size=args.grad_step_size, init_candidates=args.grad_init),
        }
        searches = [build_search(s, **common, **per[s]) for s in (args.search or ["rs"])]

    if args.resume:
        _repair_log(out / "records.jsonl")
    rows: list[dict[str, Any]] = read_jsonl(out / "records.jsonl") if args.resume else []
    done = {(r["key"], float(r["acceleration"]), r["search"]) for r in rows}
    cfs = args.center_fractions or [None] * len(args.accelerations)

    for acc, cf in zip(args.accelerations, cfs):
        mask_func = create_mask_func(mask_type, [acc], None if cf is None else [cf])
        if args.data is not None:
            dataset = open_mri_dataset(args.data, mask_func, crop=crop)
        else:
            geometry = {k: tuple(v) for k, v in (ck_physics.get("phantom") or {}).items() if k in ("shape", "recon_size")}
            geometry.update(phantom_options(args))
            dataset = open_mri_dataset(None, mask_func, crop, volumes=args.phantom_volumes, seed=args.phantom_seed,
                                       **geometry)
        if args.limit is not None:
            dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate_mri, num_workers=0)
        tags = {sr.name: _tag(sr.name, acc) for sr in searches}
        examples = {n: _Examples(out / "examples" / f"{t}.pt", args.criterion) for n, t in tags.items()}
        mine = {n: [r for r in rows if r["search"] == n and float(r["acceleration"]) == float(acc)] for n in tags}
        bar = tqdm(loader, desc=f"fnaf {acc:g}x", unit="batch", disable=None, dynamic_ncols=True)
        for bi, batch in enumerate(bar):
            for search in searches:
                if all((k, float(acc), search.name) in done for k in batch.keys):
                    continue
                result = search(model, batch, mask_func)
                if len(result) == 0:
                    continue
                new = [r for r in result.rows(model_name)
                       if (r["key"], float(r["acceleration"]), r["search"]) not in done]
                save_features(out / "features" / tags[search.name] / f"batch_{bi:05d}.pt", result, model_name)
                examples[search.name].offer(new, lambda which, res=result, b=batch, new=new: example_images(
                    model, b, mask_func, res, objective, [res.keys.index(new[w]["key"]) for w in which]))
                append_jsonl(out / "records.jsonl", new)
                rows.extend(new)
                mine[search.name].extend(new)
                done.update((r["key"], float(r["acceleration"]), r["search"]) for r in new)
                write_csv(out / "records.csv", rows, RECORD_COLUMNS)
            bar.set_postfix({f"{n} rate": f"{100 * sum(bool(r['success']) for r in m) / len(m):.1f}%"
                             for n, m in mine.items() if m})
        bar.close()

    if rows:
        write_csv(out / "records.csv", rows, RECORD_COLUMNS)
    summary = _write_summary(out, rows, model_name, args, source_rows, crop)
    if not args.no_figures:
        _write_figures(out, rows, args, objective)
    print(summary["tables_markdown"], end="")
    print(f"records: {out / 'records.csv'}\nsummary: {out / 'summary.json'}")
    return 0


def _write_summary(out: Path, rows, model_name: str, args, source_rows, crop) -> dict[str, Any]:
    from blindspot.attacks.records import group_rows, ip_table, summarize, table2, transfer_rate
    from blindspot.fileio import atomic_write_text, write_csv, write_json

    groups = group_rows(rows)
    summaries = {k: summarize(v) for k, v in groups.items()}
    t2_rows, t2_md = table2(summaries)
    ip_rows, ip_md = ip_table(summaries)
    results: dict[str, dict[str, Any]] = {}
    for (m, acc, s), sm in summaries.items():
        results.setdefault(f"{acc:g}x", {})[s] = sm
    transfer = {}
    if source_rows:
        for (m, acc, s), v in groups.items():
            if not s.startswith("replay-"):
                continue
            src_search = s[len("replay-"):]
            src = [r for r in source_rows if r["search"] == src_search and float(r["acceleration"]) == acc]
            tr = transfer_rate(src, v, criterion=args.criterion)
            tr["source_model"] = src[0]["model"] if src else ""
            tr["target_model"] = m
            transfer.setdefault(f"{acc:g}x", {})[src_search] = tr
    md = "## FNAF attack (Table 2)\n\n" + t2_md + "\n## Information preservation\n\n" + ip_md
    if transfer:
        md += "\n## Transferability\n\n| acceleration | search | source → target | transfer rate (%) | 95% CI |\n"
        md += "| --- | --- | --- | --- | --- |\n"
        for a, per in transfer.items():
            for s, tr in per.items():
                rate = tr["transfer_rate"]
                md += (f"| {a} | {s} | {tr['source_model']} → {tr['target_model']} | "
                       f"{100 * rate:.2f} | [{100 * tr['ci_low']:.2f}, {100 * tr['ci_high']:.2f}] |\n")
    summary = {
        "model": model_name,
        "criterion": args.criterion,
        "family": args.family,
        "settings": _settings(args),
        "crop": list(crop) if crop else None,
        "results": results,
        "table2": t2_rows,
        "ip_table": ip_rows,
        "transfer": transfer,
        "tables_markdown": md,
    }
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "tables.md", md)
    if t2_rows:
        write_csv(out / "table2.csv", t2_rows)
        write_csv(out / "ip_table.csv", ip_rows)
    return summary


def _write_figures(out: Path, rows, args, objective) -> None:
    from blindspot.attacks.features import Region
    from blindspot.attacks.records import group_rows
    from blindspot.report.fnaf_figures import example_panels, location_heatmap, loss_vs_ip_scatter

    figs = out / "figures"
    for (m, acc, s), v in group_rows(rows).items():
        tag = _tag(s, acc)
        ex_path = out / "examples" / f"{tag}.pt"
        examples = {}
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
        box = Region("center", fraction=args.region_fraction).box(*shape) if args.region == "center" else None
        location_heatmap(v, shape, figs / f"locations_{tag}.png", region_box=box,
                         title=f"{m} {s.upper()} {acc:g}x: FNAF locations")
        thr = float(v[0].get("loss_threshold", objective.loss_threshold))
        loss_vs_ip_scatter(v, figs / f"loss_vs_ip_{tag}.png", thr, float(v[0].get("ip_threshold", 1e-4)),
                           title=f"{m} {s.upper()} {acc:g}x")
        ordered = {k: examples[k] for k in ("failed", "successful") if k in examples}
        example_panels(ordered, figs / f"examples_{tag}.png", title=f"{m} {s.upper()} {acc:g}x")
