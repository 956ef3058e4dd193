"""`attnscope check MODEL`: the verdict table on the command line (cli.py only registers it).

Exit code 0 when no row FAILs (every row passes, or is refused by name), 1 when a row FAILs, 2 on bad input."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `check` on an argparse sub-parser collection."""
    p = sub.add_parser("check", help="prove captured attention equals the model's own eager attention on a probe "
                                     "(forward and decode steps), token maps, strength-0 edits and restore")
    p.add_argument("model", help="zoo name (smollm2-135m, minilm, dinov2-small, ...) or local model directory")
    p.add_argument("--steps", type=int, default=3, help="greedy decode steps compared after the prefill (default 3)")
    p.add_argument("--atol", type=float, help="largest |captured - eager| that passes (default 1e-4; 2e-2 in half "
                                              "precision)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the Markdown table to this file")
    from ..cli import add_placement_options

    add_placement_options(p)  # the model to trust as it runs: split over devices, the CPU and disk
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    from ..cli import placement_options
    from ..models import zoo
    from .runner import check

    if args.steps < 0:
        raise ValueError(f"--steps must be 0 or more; got {args.steps}")
    if args.atol is not None and not args.atol > 0:
        raise ValueError(f"--atol must be a positive number; got {args.atol}")
    result = check(zoo.load(args.model, **placement_options(args)), steps=args.steps, atol=args.atol)
    if args.json:
        print(json.dumps(result.to_dict()))
    elif args.markdown:
        print(result.to_markdown())
    else:
        print(result)
    if args.out:
        Path(args.out).write_text(result.to_markdown())
    return 0 if result.ok else 1
