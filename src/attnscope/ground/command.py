"""`attnscope ground MODEL --image ... --question ...`: the command line over `attnscope.ground` (cli.py registers it)."""
from __future__ import annotations

import json


def add_parser(sub):
    from . import DEFAULT_METHOD, METHODS

    p = sub.add_parser("ground", help="where in the image a question points: a map, a box and point prompts (VLMs)")
    p.add_argument("model", help="a vision-language model: zoo name (scene-vlm) or model directory")
    p.add_argument("--image", required=True, help="photo name or image path")
    p.add_argument("--question", required=True, help='e.g. "Is there a bag in the image?"')
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"default: {DEFAULT_METHOD}")
    p.add_argument("--target", help="a word of the question whose tokens are the queries (default: the answer position)")
    p.add_argument("--reask", choices=["both", "crop"], help="also crop the grounded region and answer again")
    p.add_argument("--out", help=".png (map, box, points over the image) or .json")
    return p


def run(args) -> int:
    from ..models.zoo import load
    from . import check_model, ground, reask

    if args.out and not args.out.lower().endswith((".png", ".json")):
        raise ValueError(f"--out must end in .png or .json; got {args.out!r}")
    model = load(args.model)
    check_model(model)
    g = ground(model, args.image, args.question, method=args.method, target=args.target)
    print(json.dumps({"method": g.method, "target": g.target, "box": list(g.box), "points": [list(p) for p in g.points],
                      "pixel_size": list(g.pixel_size), "cost": g.cost}))
    if args.reask:
        r = reask(model, args.image, args.question, mode=args.reask, method=args.method, target=args.target)
        print(json.dumps({"answer": r.answer, "mode": r.mode, "crop": list(r.crop), "cost": r.cost}))
    if args.out:
        g.save(args.out)
        print(f"wrote {args.out}")
    return 0
