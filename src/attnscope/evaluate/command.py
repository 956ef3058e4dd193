"""`attnscope eval pope|chair`: object hallucination of a vision-language model on the scene world, optionally
steered (cli.py only registers it). `--shard` splits the questions over processes and machines (`evaluate/shards.py`):
alone under `accelerate launch` / `torchrun`, or `--shard INDEX/COUNT` per run and `--merge` after."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `eval` on an argparse sub-parser collection."""
    from .pope import SPLITS

    p = sub.add_parser("eval", help="POPE or CHAIR object hallucination of a vision-language model on the scene world")
    p.add_argument("benchmark", choices=["pope", "chair"])
    p.add_argument("--model", default="scene-vlm", help="a vision-language model: zoo name or model directory "
                                                        "(default scene-vlm)")
    p.add_argument("--steer", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="steering method, repeatable: pai:alpha=0.5, vcd, fastv:k=2,keep=0.5")
    p.add_argument("--n", type=int, help="POPE: questions per split (default 500); CHAIR: images (default 200)")
    p.add_argument("--split", default=",".join(SPLITS), help=f"POPE splits, comma-separated (default {','.join(SPLITS)})")
    p.add_argument("--scene-split", default="test", help="scene-world split the images come from (default test)")
    p.add_argument("--new-tokens", type=int, help="answer length (default 8 for POPE, 64 for CHAIR)")
    p.add_argument("--prompt", help="CHAIR caption prompt (default 'Describe the image.')")
    p.add_argument("--seed", type=int, default=0, help="question sampling, decoding seeds and the bootstrap")
    p.add_argument("--sample", action="store_true", help="sample answers (seeded per question) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--out", help="JSON lines: one line per answer/caption, then the summary")
    p.add_argument("--shard", nargs="?", const=True, default=None, metavar="INDEX/COUNT",
                   help="alone: under `accelerate launch` or `torchrun` (one machine or several), each process answers "
                        "its share and rank 0 merges into --out; INDEX/COUNT: answer shard INDEX (0-based) of COUNT "
                        "into OUT.shard-INDEX-of-COUNT.jsonl, for --merge later")
    p.add_argument("--merge", action="store_true",
                   help="merge the shard files next to --out (same --n, --split, --seed, --scene-split as the shards; a "
                        "model, steering or decoding option given must be the shards')")
    p.add_argument("--json", action="store_true", help="print the summary metrics as one JSON object")
    p.add_argument("--progress", action="store_true", help="report progress on stderr")
    from ..cli import add_placement_options

    add_placement_options(p)
    p.set_defaults(fn=run)
    return p


def _progress(done: int, total: int) -> None:
    print(f"\r{done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def pope_table(metrics: dict) -> str:
    """Per split: accuracy, precision, recall, F1, yes-ratio and unparseable rate, each with its 95% interval."""
    from .bootstrap import fmt

    names = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable")
    rows = ["| split | n | accuracy | precision | recall | F1 | yes-ratio | unparseable |", "|---" * 8 + "|"]
    for split, m in metrics.items():
        cells = [fmt(m["ci"][k]) if k in m["ci"] else f"{m.get(k, float('nan')):.3f}" for k in names]
        rows.append(f"| {split} | {m['n']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run(args) -> int:
    import warnings

    from ..capture.trace import UncheckedMetadataWarning
    from .bootstrap import FewUnitsWarning

    said = (FewUnitsWarning, UncheckedMetadataWarning)  # one `warning:` line each; any other warning as Python shows it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FewUnitsWarning)
        warnings.simplefilter("always", UncheckedMetadataWarning)
        try:
            rc = _run(args)
        finally:
            for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, said)):
                print(f"warning: {message}", file=sys.stderr)
            others = {(str(w.message), w.category, w.filename, w.lineno): w for w in caught
                      if not issubclass(w.category, said)}
    for w in others.values():  # recording caught them all: shown once each, under the filters in force outside
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return rc


def _run(args) -> int:
    from ..models.zoo import load
    from . import chair, pope, shards

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1; got {args.n}")
    if (args.shard or args.merge) and not args.out:
        raise ValueError("--shard and --merge use the shard files next to --out; pass --out")
    if args.shard is not None and args.merge:
        raise ValueError("--merge merges shards that already ran; run it without --shard")
    if isinstance(args.shard, str):
        shards.parse(args.shard)  # a bad INDEX/COUNT before the model loads
    elif args.shard and shards.from_launcher().count == 1:
        print(f"warning: {shards.SINGLE}", file=sys.stderr)
    elif args.shard is None and not args.merge and shards.from_launcher().count > 1:
        raise ValueError(f"this is one of {shards.from_launcher().count} launched processes but --shard is not set, so "
                         "each would answer every question and write the same --out; add --shard")
    steer = [pope.resolve_steer(spec) for spec in args.steer] or None  # SteerError before the model loads
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    bad = [s for s in splits if s not in pope.SPLITS]
    if bad or not splits:
        raise ValueError(f"unknown POPE splits {bad}; splits are {', '.join(pope.SPLITS)}")
    if args.merge:
        return _report(args, _merge(args, splits, steer))
    from ..cli import placement_options

    options = placement_options(args)
    launched = shards.from_launcher()
    if options.get("offload_folder") and launched.count > 1:
        # one folder per process: processes placing into one folder rewrite the files the others are reading
        options["offload_folder"] = str(Path(options["offload_folder"]) / f"rank-{launched.index}")
    model = load(args.model, **options)
    pope.Generator(model)  # NotAVisionLanguageModel now, before the questions are built
    common = dict(steer=steer, sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  out=args.out, shard=args.shard, boot=args.boot, progress=_progress if args.progress else None)
    if args.new_tokens is not None:
        common["max_new_tokens"] = args.new_tokens
    if args.benchmark == "pope":
        questions, image_of = pope.scene_questions(n=args.n or 500, scene_split=args.scene_split, seed=args.seed,
                                                   splits=splits)
        result = pope.evaluate_pope(model, questions, image_of, **common)
    else:
        images, image_of = chair.scene_images(n=args.n or 200, split=args.scene_split)
        if args.prompt:
            common["prompt"] = args.prompt
        result = chair.evaluate_chair(model, images, image_of, **common)
    if result is None:  # a shard written for --merge, or a launched shard other than rank 0 (which reports)
        if isinstance(args.shard, str):
            print(f"wrote shard {args.shard} next to {args.out}; merge all shards with --merge --out {args.out}")
        return 0
    return _report(args, result)


def _asked(args, steer) -> dict:
    """The shard settings this command line names (options left at their defaults name none): `--merge` refuses
    shards that ran with others, rather than report their result under these options."""
    asked = {"steer": repr(steer) if steer else None, "max_new_tokens": args.new_tokens,
             "sample": args.sample or None, "prompt": args.prompt,
             "temperature": args.temperature if args.temperature != 1.0 else None,
             "top_p": args.top_p if args.top_p != 1.0 else None,
             "model": args.model if args.model != "scene-vlm" and "/" not in args.model else None}
    return {k: v for k, v in asked.items() if v is not None}


def _merge(args, splits, steer=None):
    from . import chair, pope

    expect = _asked(args, steer)
    if args.benchmark == "pope":
        questions, _ = pope.scene_questions(n=args.n or 500, scene_split=args.scene_split, seed=args.seed, splits=splits)
        return pope.merge_pope(questions, args.out, boot=args.boot, expect=expect)
    images, _ = chair.scene_images(n=args.n or 200, split=args.scene_split)
    return chair.merge_chair(images, args.out, boot=args.boot, expect=expect)


def _report(args, result) -> int:
    if args.json:
        print(json.dumps({"benchmark": args.benchmark, "config": result.config, "metrics": result.metrics}))
    else:
        unit = "questions" if args.benchmark == "pope" else "images"
        print(f"{args.benchmark.upper()} on {result.config['model']}, {result.config['method']}: "
              f"{len(result.records)} {unit}, {'sampled' if result.config.get('sample') else 'greedy'}, 95% bootstrap intervals")
        print(pope_table(result.metrics) if args.benchmark == "pope" else result.table())
    if args.out:
        print(f"wrote {args.out}")
    return 0
