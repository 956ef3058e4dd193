"""`attnscope explain`: the command line over `attnscope.explain` (cli.py only registers it)."""
from __future__ import annotations

import argparse
import json
import sys


def _value(text: str):
    """Parameter values from the command line: JSON when it parses (numbers, lists, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `explain` on an argparse sub-parser collection."""
    from . import METHODS

    p = sub.add_parser("explain", help="explain one image or text with an attention-based method or a baseline")
    p.add_argument("--model", required=True, help="zoo name (dinov2-small, minilm, smollm2-135m) or model directory")
    p.add_argument("--image", help="photo name (chelsea, astronaut, ...) or image path")
    p.add_argument("--text")
    p.add_argument("--method", default="gradattn", choices=list(METHODS), help="default: gradattn")
    p.add_argument("--target", choices=["default", "next_token", "embedding", "class"], default="default",
                   help="what to explain (default: next-token log-prob for LMs, embedding similarity for encoders)")
    p.add_argument("--reference", help="for --target embedding: a reference sentence (text) or photo/path (image)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, repeatable: --param sinks=discount --param head_fusion=max")
    p.add_argument("--size", help="image size HxW for the model input, e.g. 224x308")
    p.add_argument("--faithfulness", action="store_true", help="also print deletion/insertion AUC beside the random map's, with which direction is better")
    p.add_argument("--out", required=True, help=".png, .html, .json or .safetensors")
    from ..cli import add_placement_options, add_prompt_options

    add_prompt_options(p)
    add_placement_options(p)
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    from ..models.zoo import load
    from . import explain
    from .targets import EmbeddingSimilarity, NextToken

    from ..cli import prompt_chat

    if args.text is None and args.image is None:
        print("error: pass --text and/or --image", file=sys.stderr)
        return 2
    params = {}
    for item in args.param:
        if "=" not in item:
            print(f"error: --param takes NAME=VALUE; got {item!r}", file=sys.stderr)
            return 2
        name, value = item.split("=", 1)
        params[name.strip()] = _value(value)
    from ..cli import placement_options

    model = load(args.model, **placement_options(args))
    kwargs = {}
    if args.size:
        h, w = (int(v) for v in args.size.lower().split("x"))
        kwargs["size"] = {"height": h, "width": w}
    if args.image is not None:
        from ..models.images import load_image

        photo = load_image(args.image)
        inputs = model.encode(text=args.text, image=photo, chat=prompt_chat(args), **kwargs)
    else:
        photo, inputs = None, model.encode(text=args.text, chat=prompt_chat(args))
    target = None
    if args.target == "next_token":
        target = NextToken()
    elif args.target == "class":
        target = "class"
    elif args.target == "embedding":
        ref = None
        if args.reference:
            ref = model.encode(text=args.reference) if args.image is None else model.encode(image=args.reference, **kwargs)
        target = EmbeddingSimilarity(reference=ref)
    e = explain(model, inputs, method=args.method, target=target, **params)
    e.photo = photo
    path = e.save(args.out)
    top = ", ".join(f"{tok}={score:.3g}" for _, tok, score in e.top(5))
    print(f"wrote {path}: {e.title()} on {e.model}, target {e.target.get('name')} = {e.target_value:.4g}, "
          f"{e.seconds:.2f} s; top: {top}")
    if args.faithfulness:
        print(e.faithfulness().table())
    return 0
