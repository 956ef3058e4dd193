"""`attnscope flow`: the command line over `attnscope.flow.knockout_curve` (cli.py only registers it)."""
from __future__ import annotations

import sys


def add_parser(sub):
    from .sets import SETS

    p = sub.add_parser("flow", help="attention knockout: the answer's probability change when one token set cannot "
                                    "read another in a sliding window of layers")
    p.add_argument("model", help="zoo name (scene-vlm, smollm2-135m) or model directory")
    p.add_argument("--text", "--question", dest="text", required=True,
                   help="the prompt (a VLM puts it in its chat template with the image); its words are the question set")
    p.add_argument("--image", help="scene name (scene:test-000003), photo name or image path (VLMs)")
    p.add_argument("--subject", help="words of the subject set (taken out of the question set)")
    p.add_argument("--source", help=f"the set whose keys are blocked: {', '.join(SETS)}")
    p.add_argument("--target", help="the set whose query rows cannot read them")
    p.add_argument("--window", type=int, default=4, help="layers per window (default 4)")
    p.add_argument("--stride", type=int, default=1, help="layers between window starts (default 1); a last window always ends at the last layer (the output lists every window)")
    p.add_argument("--answer", help="answer word: its first token, so write a leading space where the prompt needs one "
                                    "(' Paris' after 'is'); default the model's most likely next token")
    p.add_argument("--out", help=".json (curve) or .png (figure)")
    from ..cli import add_prompt_options

    add_prompt_options(p)
    return p


def run(args) -> int:
    from ..cli import image_input, prompt_chat
    from ..models.zoo import load
    from . import knockout_curve

    if (args.source is None) != (args.target is None):
        print("error: pass --source and --target together (or neither, for the default flows)", file=sys.stderr)
        return 2
    if args.out and not args.out.lower().endswith((".json", ".png")):
        print(f"error: --out must end in .json or .png; got {args.out!r}", file=sys.stderr)
        return 2
    flows = [(args.source, args.target)] if args.source else None
    image = image_input(args.image) if args.image else None
    model = load(args.model)
    curve = knockout_curve(model, args.text, image=image, flows=flows, window=args.window, stride=args.stride,
                           subject=args.subject, answer=args.answer, chat=prompt_chat(args))
    ex = curve.examples[0]
    print(f"{curve.model}: answer {ex['answer']!r} (p = {ex['p']:.4f}{'' if ex['top1'] else ', not the top token'}); "
          f"relative change per window of {curve.window} layers")
    print(curve.to_markdown())
    if args.out:
        print(f"wrote {curve.save(args.out)}")
    return 0
