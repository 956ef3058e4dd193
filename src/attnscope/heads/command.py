"""`attnscope heads`: per-head metrics and importance as a table (cli.py only registers it)."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `heads` on an argparse sub-parser collection."""
    from .table import METRICS

    p = sub.add_parser("heads", help="per-head metrics (entropy, role/sink mass, VHD, ablation, Shapley) as a table")
    p.add_argument("--model", required=True, help="zoo name (dinov2-small, minilm, smollm2-135m, scene-vlm) or model directory")
    p.add_argument("--text")
    p.add_argument("--image", help="photo name (chelsea, astronaut, ...) or image path")
    p.add_argument("--metrics", default="entropy,role_mass,sink_mass", help=f"comma-separated, from {', '.join(METRICS)}")
    p.add_argument("--target", help="for ablation/ablation_grad/shapley: a continuation text (' Paris'), a token id, "
                                    "or 'cls' (vision); default: the model's own next token, or CLS similarity")
    p.add_argument("--stream", help="one stream (vision, language, text, ...); default all")
    p.add_argument("--layers", help="comma-separated, negative allowed: 0,-1")
    p.add_argument("--queries", help="query rows for entropy/role_mass/sink_mass: a role (last, cls, text, ...)")
    p.add_argument("--samples", type=int, default=8, help="Shapley permutations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    p.add_argument("--sort", help="metric column to sort by, largest first (default: the first metric)")
    p.add_argument("--csv", metavar="PATH", help="write the whole table as CSV")
    p.add_argument("--json", metavar="PATH", help="write the whole table (rows and meta) as JSON")
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    from ..models.zoo import load
    from .table import table

    if args.text is None and args.image is None:
        print("error: pass --text and/or --image", file=sys.stderr)
        return 2
    for path, suffix in ((args.csv, ".csv"), (args.json, ".json")):
        if path and not path.endswith(suffix):
            print(f"error: the path after --{suffix[1:]} must end in {suffix}; got {path!r}", file=sys.stderr)
            return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    layers = None if args.layers is None else [int(t) for t in args.layers.split(",") if t.strip()]
    target = args.target
    if target is not None and target.lstrip("-").isdigit():
        target = int(target)
    model = load(args.model)
    if args.text is not None and args.image is not None and hasattr(model, "prompt"):
        inputs = model.encode(model.prompt(args.text), args.image)
    else:
        inputs = model.encode(text=args.text, image=args.image)
    t = table(model, inputs, metrics=metrics, streams=args.stream, layers=layers, queries=args.queries,
              target=target, samples=args.samples, seed=args.seed)
    sort = args.sort or next(iter(t.columns), None)
    if sort is not None:
        t.column(sort)  # KeyError naming the columns if --sort is not one
    shown = len(t) if args.top <= 0 else min(args.top, len(t))
    about = f", target {t.meta['target']}" if "target" in t.meta else ""
    print(f"{model.name}: {len(t)} heads{about}; top {shown} by {sort}")
    print(t.to_text(sort=sort, k=shown))
    if "entropy" in t.columns:
        print("entropy: nats (-sum p ln p of each query row, averaged over rows), as in the viewer")
    if "sink_mass" in t.columns:
        from ..explain.sinks import DEFINITION

        print(f"sink_mass: attention share on the sinks; {DEFINITION}")
    for path in (args.csv, args.json):
        if path:
            print(f"wrote {t.save(path)}")
    return 0
