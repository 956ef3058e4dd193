"""`attnscope ground MODEL --image ... --question ...`: the command line over `attnscope.ground` (cli.py registers it)."""
from __future__ import annotations

import json


def add_parser(sub):
    from . import DEFAULT_METHOD, METHODS

    p = sub.add_parser("ground", help="where in the image a question points: a map, a box and point prompts (VLMs)")
    p.add_argument("model", help="a vision-language model: zoo name (scene-vlm) or model directory")
    p.add_argument("--image", required=True, help="scene name (scene:test-000003), photo name or image path")
    p.add_argument("--question", required=True, help='e.g. "Is there a bag in the image?"')
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"default: {DEFAULT_METHOD}")
    p.add_argument("--target", help="a word of the question whose tokens are the queries (default: the answer position)")
    p.add_argument("--reask", choices=["both", "crop"], help="also crop the grounded region and answer again")
    p.add_argument("--out", help=".png (map, box, points over the image) or .json")
    return p


def run(args) -> int:
    from ..cli import image_input
    from ..models.zoo import load
    from . import check_model, ground, reask

    if args.out and not args.out.lower().endswith((".png", ".json")):
        raise ValueError(f"--out must end in .png or .json; got {args.out!r}")
    model = load(args.model)
    check_model(model)
    photo = image_input(args.image)
    g = ground(model, photo, args.question, method=args.method, target=args.target)
    print(json.dumps({"method": g.method, "target": g.target, "pixels": "model input", "box": list(g.box),
                      "points": [list(p) for p in g.points], "pixel_size": list(g.pixel_size), "cost": g.cost}))
    if args.reask:  # crops the region just grounded (no second grounding pass)
        r = reask(model, photo, args.question, mode=args.reask, box=g.scale(photo.size)[0])
        cost = {**r.cost, "grounding_forwards": g.cost["forwards"], "grounding_backwards": g.cost["backwards"]}
        print(json.dumps({"answer": r.answer, "mode": r.mode, "pixels": "photo", "crop": list(r.crop), "cost": cost}))
    if args.out:
        g.save(args.out)
        print(f"wrote {args.out}")
    return 0
