"""`attnscope generate`: generate a continuation, optionally steered (cli.py only registers it)."""
from __future__ import annotations

import argparse
import contextlib
import json
import time


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `generate` on an argparse sub-parser collection."""
    from .methods import METHODS

    p = sub.add_parser("generate", help="generate a continuation, optionally steered by attnscope.steer methods")
    p.add_argument("--model", required=True, help="zoo name (smollm2-135m, scene-vlm) or model directory")
    p.add_argument("--text", required=True, help="the prompt (for a VLM: the question about --image)")
    p.add_argument("--image", help="photo name (chelsea, astronaut, ...) or image path; needs a vision-language model")
    p.add_argument("--steer", action="append", default=[], metavar="NAME[:k=v,...]",
                   help=f"steering method, repeatable: pai:alpha=0.5 or heads:heads=3.1+5.2; methods: {', '.join(sorted(METHODS))}")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="print the unsteered continuation first")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    from ..cli import add_placement_options, add_prompt_options

    add_prompt_options(p)
    add_placement_options(p)
    p.set_defaults(fn=run)
    return p


def _inputs(model, text: str, image, chat: bool | None) -> dict:
    """The prompt's inputs: `Model.encode` builds a VLM's chat prompt (with the image placeholder when an image is
    given; a VLM's text-only prompt is its chat turn too); a text model uses the chat template only with --chat.
    `chat=False` (--raw-prompt) keeps the text as typed."""
    if chat is None and model.spec.kind == "vlm":
        chat = None if image is not None else True
    return model.encode(text, image=image, chat=chat)


def _continue(model, inputs: dict, methods: list, args) -> tuple[str, float, int]:
    """(continuation, seconds, new tokens) of a text prompt, with `methods` applied around generate."""
    import torch

    from .session import steer

    from .methods import generate_kwargs

    kwargs = {"max_new_tokens": args.new_tokens, "do_sample": args.sample, **generate_kwargs(methods)}
    if args.sample:
        torch.manual_seed(args.seed)
    ctx = steer(model, *methods) if methods else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.no_grad(), ctx:
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    text = model.tokenizer.decode(new, skip_special_tokens=True)
    return (text.strip() if model.spec.kind == "vlm" else text), seconds, int(new.numel())


def run(args) -> int:
    from ..models.zoo import load
    from .methods import parse

    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1; got {args.new_tokens}")
    methods = [parse(spec) for spec in args.steer]  # SteerError (unknown method, bad parameter) before loading
    from ..cli import placement_options

    model = load(args.model, **placement_options(args))
    if model.tokenizer is None:
        raise ValueError(f"{model.name} has no tokenizer and cannot generate text")
    from ..cli import prompt_chat

    if args.image is not None and model.image_processor is None:
        raise ValueError(f"{model.name} is not a vision-language model (it takes no images); --image needs one such as scene-vlm")
    inputs = _inputs(model, args.text, args.image, prompt_chat(args))

    def answer(items):
        return _continue(model, inputs, list(items), args)

    results = {}
    if args.compare:
        results["unsteered"] = answer([])
    results["steered"] = answer(methods)
    if args.json:
        text, seconds, n = results["steered"]
        doc = {"model": model.name, "prompt": args.text, "image": args.image, "steer": list(args.steer),
               "methods": [repr(m) for m in methods], "text": text, "new_tokens": n, "seconds": round(seconds, 4)}
        if args.compare:
            text, seconds, n = results["unsteered"]
            doc["unsteered"] = {"text": text, "new_tokens": n, "seconds": round(seconds, 4)}
        print(json.dumps(doc))
    elif args.compare:
        label = " + ".join(args.steer) or "no --steer given"
        print(f"unsteered: {results['unsteered'][0]}")
        print(f"steered ({label}): {results['steered'][0]}")
    else:
        print(results["steered"][0])
    return 0
