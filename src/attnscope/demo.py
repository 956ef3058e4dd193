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


def explanations(out: Path) -> dict:
    """Explanation methods side by side on the photos, and sink-aware rollout before/after."""
    from .explain.figures import demo_figures

    return demo_figures(out)


def head_tables(out: Path) -> dict:
    """Head tables: SmolLM2 (entropy, role and sink mass, ablation importance on a copied answer) and DINOv2
    (CLS-row metrics, ablation importance on the CLS embedding), saved as CSV and as layer x head figures."""
    from . import heads
    from .viz.figures import metric_grid_figure

    facts = {}
    smol = load("smollm2-135m")
    x = smol.encode("Alice lives in Paris. Bob lives in Rome. Alice lives in")
    t = heads.table(smol, x, metrics=["entropy", "role_mass", "sink_mass", "ablation"], layers=list(range(20, 30)),
                    target=" Paris")
    t.save(out / "smollm2_heads.csv")
    metric_grid_figure(t, ["entropy", "sink_mass", "ablation"], out / "smollm2_heads.png",
                       "SmolLM2-135M layers 20-29: head entropy, sink mass, ablation importance on log p(' Paris')")
    facts["smollm2-135m"] = {"target": t.meta.get("target"), "top_ablation": [list(h) for h in t.top("ablation", 5)]}
    dino = load("dinov2-small")
    x = dino.encode(image="chelsea")
    t = heads.table(dino, x, metrics=["entropy", "role_mass", "sink_mass", "ablation"], queries="cls")
    t.save(out / "dinov2_heads.csv")
    metric_grid_figure(t, ["entropy", "image_ratio", "ablation"], out / "dinov2_heads.png",
                       "DINOv2-S/14 on chelsea, CLS row: head entropy, image ratio, ablation importance on the CLS embedding")
    facts["dinov2-small"] = {"target": t.meta.get("target"), "top_ablation": [list(h) for h in t.top("ablation", 5)]}
    print(t.to_text(sort="ablation", k=8))
    return facts


def steering(out: Path) -> dict:
    """SmolLM2: amplifying attention to one fact's span (PAI-style, layers 20-29) raises the answer copied from it."""
    from .steer import PAI, steer

    model = load("smollm2-135m")
    prompt = "Alice lives in Paris. Bob lives in Rome. Bob lives in"
    x = model.encode(prompt)
    ids = x["input_ids"][0].tolist()
    facts = {"prompt": prompt}
    for word in (" Paris", " Rome"):
        token = model.tokenizer(word, add_special_tokens=False)["input_ids"][0]
        span = [i for i, t in enumerate(ids) if t == token]
        probs = {}
        for alpha in (0.0, 0.5, 1.0, 2.0):
            with torch.no_grad(), steer(model, PAI(alpha=alpha, keys=span, layers=range(20, 30))):
                logits = model.hf(**x).logits[0, -1]
            probs[alpha] = round(float(logits.softmax(-1)[token]), 4)
        facts[f"p({word.strip()}) with its span amplified, by alpha"] = probs
    return facts


def scene_vlm(out: Path) -> dict:
    """The trained scene-vlm, used the documented way: `model.encode(question, image=...)` builds its chat prompt
    with the image placeholder; captions and yes/no answers on held-out scenes with exact ground truth, and the
    default explanation (gradattn's bi-modal rule) of one answer."""
    from .explain import explain
    from .models import scene_vlm as svlm
    from .scenes import SceneWorld, caption_scores, question

    if not (svlm.WEIGHTS_DIR / svlm.WEIGHTS_FILE).is_file():
        return {"skipped": f"no trained weights; run {svlm.TRAIN_SCRIPT}"}
    model, world = load("scene-vlm"), SceneWorld(seed=0)

    def ask(image, text: str) -> tuple[str, dict]:
        inputs = model.encode(text, image=image)  # the VLM recipe: chat prompt + image placeholder, built for you
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        return model.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip(), inputs

    rows = []
    for i in range(4):
        scene = world.scene("test", i)
        caption = ask(scene.image, "Describe the image.")[0]
        present = scene.objects[0].cls
        answer, inputs = ask(scene.image, question(present))
        rows.append({"truth": scene.caption(), "caption": caption,
                     "class_f1": round(caption_scores(caption, scene)["class"]["f1"], 3), question(present): answer})
        scene.image.save(out / f"scene_test_{i}.png")
        if i == 0:  # what the answer's first token looked at: relevance carried through the pooling projector
            e = explain(model, inputs)
            e.save(out / "scene_vlm_explain.png")
            rows[-1]["explained"] = {"method": e.method, "target": e.target, "bimodal": e.extras.get("bimodal")}
    return {"scenes": rows}


def run(out: str | Path = "demo-out") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    jobs = (("dinov2-small", dinov2_photos), ("minilm", minilm_heads), ("smollm2-135m", smollm_generation),
            ("explain", explanations), ("heads", head_tables), ("steer", steering), ("scene-vlm", scene_vlm))
    for name, job in jobs:
        start = time.perf_counter()
        summary[name] = job(out) | {"seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: done in {summary[name]['seconds']} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out
