"""``blindspot demo`` (``make demo``): the audit of the bundled demo models on freshly generated phantoms.

The same as ``blindspot audit --out runs/demo --lesion-phantoms 8``: the standard U-Net, the FNAF-robust U-Net and the
I-RIM shipped in ``blindspot/weights`` are evaluated (Table 1) and attacked with RS, FD and gradient searches at 4x and
8x (Table 2, IP table, transferability), and scored on 8 held-out phantom volumes with planted lesions (the lesion
section); the tables are printed and ``runs/demo/report.html`` is written.
An existing demo folder is replaced (the demo is a fresh run each time).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def register(subparsers) -> None:
    from blindspot.commands.audit import add_audit_arguments

    p = subparsers.add_parser("demo", help="the main job: audit the bundled demo models (report.html)")
    add_audit_arguments(p, out_default="runs/demo", lesion_phantoms=8)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindspot.commands.audit import run as run_audit_command

    out = Path(args.out)
    if not args.resume and ((out / "audit.json").exists() and not args.model):
        shutil.rmtree(out)  # only a previous demo's folder (it has audit.json) is replaced
    return run_audit_command(args)
