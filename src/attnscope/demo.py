"""`attnscope demo`: the main job end to end on the built-in real models, written to one folder."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .capture.session import capture
from .models.images import load_image
from .models.zoo import load
from .viz import figures

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle_left", "grace_hopper")


def dinov2_photos(out: Path) -> dict:
    """CLS → patch attention of DINOv2's last layer (mean over heads) on the bundled photos."""
    model = load("dinov2-small")
    items, facts = [], {}
    for name in PHOTOS:
        photo = load_image(name).resize((224, 224))
        x = model.encode(image=photo)
        with torch.no_grad(), capture(model, layers=-1, queries="cls") as trace:
            model(**x)
        probs = trace.attention("vision", 11)[0, :, 0].mean(0)
        tmap = trace.tokens("vision")
        heat = figures.grid_map(probs, tmap)
        items.append((name, photo, heat))
        top = int(probs[tmap.positions("image")].argmax())
        facts[name] = {"max_patch_share": round(float(heat.max()), 4), "argmax_patch": tmap.patch[tmap.positions("image")[top]]}
    figures.image_attention_figure(items, out / "dinov2_cls_attention.png", "DINOv2-S/14, last layer, CLS → patches (mean of 6 heads)")
    return facts


def minilm_heads(out: Path) -> dict:
    """MiniLM's full layers × heads grid on one sentence."""
    model = load("minilm")
    x = model.encode("The animal didn't cross the street because it was too tired.")
    with torch.no_grad(), capture(model) as trace:
        model(**x)
    probs = {layer: trace.attention("text", layer)[0] for layer in trace.layers("text")}
    tmap = trace.tokens("text")
    figures.head_grid_figure(probs, tmap.tokens, out / "minilm_head_grid.png", "MiniLM-L6: every layer and head")
    cls_share = {layer: round(float(p[:, :, 0].mean()), 3) for layer, p in probs.items()}
    return {"tokens": len(tmap), "mean_attention_to_[CLS]_by_layer": cls_share}


def smollm_generation(out: Path) -> dict:
    """SmolLM2's last-token attention at every decoding step of a greedy generation."""
    model = load("smollm2-135m")
    prompt = "The Eiffel Tower is in the city of"
    x = model.encode(prompt)
    n = x["input_ids"].shape[1]
    with torch.no_grad(), capture(model, queries="last", layers=[0, 15, 29]) as trace:
        ids = model.generate(**x, max_new_tokens=8, do_sample=False)
    tmap = trace.tokens("text")
    for layer in (15, 29):
        rows = trace.steps("text", layer)[0].mean(0)
        figures.generation_figure(rows, tmap.tokens, n, out / f"smollm2_generation_L{layer}.png",
                                  f"SmolLM2-135M layer {layer}: attention of each decoding step (mean of 9 heads)")
    trace.save(out / "smollm2_generation.trace.safetensors")
    rows = trace.steps("text", 29)[0].mean(0)
    return {"prompt": prompt, "answer": model.tokenizer.decode(ids[0, n:]), "steps": trace.run().steps + 1,
            "layer29_share_on_first_token": [round(float(r[0]), 3) for r in rows]}


def run(out: str | Path = "demo-out") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, job in (("dinov2-small", dinov2_photos), ("minilm", minilm_heads), ("smollm2-135m", smollm_generation)):
        start = time.perf_counter()
        summary[name] = job(out) | {"seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: done in {summary[name]['seconds']} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out
