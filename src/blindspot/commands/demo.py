"""``blindspot demo`` (``make demo``): the audits of the bundled networks, MRI and CT, on freshly generated phantoms.

1. MRI — the same as ``blindspot audit --out runs/demo --lesion-phantoms 8 --phantom-volumes 2 --phantom-slices 4
   --search rs fd``: the standard U-Net, the FNAF-robust U-Net and the I-RIM shipped in ``blindspot/weights``
   (128×128) are evaluated (Table 1) and attacked with the seed's searches, RS and FD, at 4x and 8x (Table 2 under
   both criteria, IP table, transferability) on 8 phantom slices per acceleration, and scored on 8 held-out phantom
   volumes with planted lesions (the lesion section): ``runs/demo/report.html``. These counts keep ``make demo``
   within its time budget (:data:`DEMO_MRI`); the full tables come from the longer command in
   ``blindspot/weights/mri_models.md`` (any option given on the command line replaces the demo's choice).
2. CT — ``blindspot audit --modality ct``: the bundled CNN-10, RED-CNN and WGAN-VGG on ``--ct-images`` held-out
   phantom slices whose 25 % dose is simulated in the projection domain: denoising quality, FNAF-on-CT attack rates
   with low-contrast features, IP (detectability above the noise) and transfer: ``runs/demo/ct/report.html``.

The CT audit runs beside the MRI audit, in a second process with half of the CPU threads (:func:`_run_side_by_side`;
its output, in ``ct/audit.log``, is printed after the MRI audit's); with one thread they run one after the other.
An existing demo folder is replaced (the demo is a fresh run each time).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import torch

from blindspot.commands.audit import add_audit_arguments
from blindspot.commands.audit import run as run_audit_command
from blindspot.validate import check_output_folder, non_negative_int

#: The MRI audit's image counts and searches in the demo (unless given on the command line): 2 phantom volumes × 4
#: slices per acceleration, the seed's RS and FD — what keeps ``make demo`` under 180 s on two CPU cores with the
#: 128×128 networks (measured: ``blindspot/weights/mri_models.md``). The CT audit keeps all three searches.
DEMO_MRI: dict[str, object] = {"phantom_volumes": 2, "phantom_slices": 4, "search": ["rs", "fd"]}
CT_SEARCHES: list[str] = ["rs", "fd", "grad"]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job: audit the bundled MRI networks and CT denoisers (report.html)")
    add_audit_arguments(p, out_default="runs/demo", lesion_phantoms=8)
    p.add_argument("--ct-images", type=non_negative_int, default=8,
                   help="CT phantom slices of the CT audit (default 8; 0 skips the CT audit)")
    p.set_defaults(func=run, **{k: None for k in DEMO_MRI})


def _is_demo_folder(out: Path) -> bool:
    """Only a previous audit's folder (its run.json says so) is replaced."""
    try:
        return json.loads((out / "run.json").read_text()).get("command") == "audit"
    except (OSError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_output_folder(out, "--out", inputs=[args.data])
    if not args.resume and not args.model and _is_demo_folder(out):
        shutil.rmtree(out)
    given = {k: getattr(args, k) for k in DEMO_MRI}
    for k, v in DEMO_MRI.items():
        if getattr(args, k) is None:
            setattr(args, k, copy.copy(v))
    if args.model or args.ct_images < 1:
        return run_audit_command(args)
    ct = copy.copy(args)
    ct.modality, ct.out, ct.lesion_phantoms, ct.family, ct.data, ct.crop = "ct", str(out / "ct"), 0, None, None, None
    ct.phantom_volumes, ct.phantom_slices = args.ct_images, 1
    ct.search = given["search"] or list(CT_SEARCHES)
    ct.func = run_audit_command
    threads = torch.get_num_threads()
    if threads < 2:
        rc = run_audit_command(args)
        return rc if rc != 0 else run_audit_command(ct)
    return _run_side_by_side(args, ct, threads)


def _run_side_by_side(mri: argparse.Namespace, ct: argparse.Namespace, threads: int) -> int:
    """The MRI audit in this process and the CT audit in a second one, each with half of the ``threads``.

    The two audits share nothing, and two processes of ``threads/2`` threads keep the cores busier than one process
    of ``threads`` running them in turn (the small networks' operations do not scale to two threads, and the report
    and figures are single-threaded). The CT audit's output goes to ``ct/audit.log`` and is printed after the MRI
    audit's. Exit status: the MRI audit's, else the CT audit's."""
    log = Path(ct.out) / "audit.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    child = multiprocessing.get_context("spawn").Process(target=_ct_child, args=(ct, threads - threads // 2, str(log)),
                                                         name="blindspot-ct-audit")
    torch.set_num_threads(threads // 2)
    child.start()
    try:
        rc = run_audit_command(mri)
    except BaseException:
        if not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # Ctrl-C reaches the child itself
            child.terminate()
        child.join()
        raise
    finally:
        torch.set_num_threads(threads)
    child.join()
    sys.stdout.flush()
    text = log.read_text(encoding="utf-8", errors="backslashreplace") if log.exists() else ""
    print(text, end="" if text.endswith("\n") or not text else "\n")
    return rc if rc != 0 else int(child.exitcode or 0)


def _ct_child(ct: argparse.Namespace, threads: int, log: str) -> None:
    """The second process of :func:`_run_side_by_side`: the CT audit with ``threads`` threads, output to ``log``."""
    from blindspot.cli import keep_freed_memory, run_command

    keep_freed_memory()
    torch.set_num_threads(threads)
    with open(log, "w", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        rc = run_command(ct)
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(rc)
