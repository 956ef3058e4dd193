#!/usr/bin/env python
"""Train `scene-vlm` (attnscope.models.scene_vlm) on the scene world, LLaVA-1.5 style, on a CPU.

    python scripts/train_scene_vlm.py                      # the committed weights: seed 0, 45-70 min on 1 core
    python scripts/train_scene_vlm.py --quick --out /tmp/x # a 2-minute smoke run

Recipe (Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5), 2023, scaled down):

1. Scenes: `--scenes` training scenes of `SceneWorld(seed=--world-seed)`: co-occurrence knob at 0.9, and
   60% of the partners it adds drawn small and barely visible (the faint-partner knob), so the pairs' prior pays off.
2. The DINOv2 tower is frozen, so its features (penultimate layer, CLS dropped: what LLaVA's
   `vision_feature_layer=-2`, strategy "default" selects) are computed once for all scenes and cached as
   safetensors. They are computed under bfloat16 autocast (3.6x faster than float32 on this CPU; relative
   difference 0.9%, which training sees as mild noise); the loaded model runs the tower in float32.
3. Stage 1 (feature alignment): only the projector trains, on captions ("Describe the image." ->
   "a red bag top left and a blue sandal bottom right.").
4. Stage 2 (instruction tuning): projector + LoRA (rank 8, alpha 16, q_proj and v_proj of all 30 layers) on
   the caption plus POPE-style yes/no questions ("Is there a bag in the image?" -> "Yes"/"No"; questions on
   present classes and on randomly drawn absent ones, balanced).

Each training sequence packs one image with several single-turn exchanges: the image prefix
("<|im_start|>user\\n" + 64 image tokens + "\\n") is computed once and every exchange attends to that prefix
and to itself only (a block mask), with positions continuing from the prefix: exactly as if each exchange were
its own prompt, which is how the model is asked at evaluation, but at the cost of one image per sequence.
Loss: next-token cross-entropy on answer tokens and their closing `<|im_end|>`, averaged per exchange and then
over exchanges (a one-word "Yes" weighs as much as a 40-token caption; with plain token averaging, the first
run of this script learned captions but answered yes/no at chance). bfloat16 autocast, AdamW,
linear warm-up then cosine decay, gradient clipping at 1. Everything is seeded; with `--threads 1` a rerun
gives the same weights.

Only the projector and the LoRA factors are saved (float32 safetensors, ~7 MB) with a JSON record of the
recipe, timings and a quick validation (teacher-forced yes/no accuracy on val scenes)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnscope.models import scene_vlm
from attnscope.models.cache import cache_dir
from attnscope.scenes import CAPTION_PROMPT, CLASSES, SceneWorld, question

YES, NO = "Yes", "No"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- features ------------------------------------------------------------------------------------------------
def tower_features(model, images, batch: int = 16) -> torch.Tensor:
    """[N, 256, 384] bfloat16: what LLaVA's get_image_features hands the projector (layer -2, CLS dropped)."""
    hf = model.hf
    projector, hf.model.multi_modal_projector = hf.model.multi_modal_projector, nn.Identity()
    out = []
    try:
        for i in range(0, len(images), batch):
            pv = model.image_processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                feats = hf.model.get_image_features(pixel_values=pv, vision_feature_layer=hf.config.vision_feature_layer,
                                                    vision_feature_select_strategy="default").pooler_output
            out.append(torch.stack(list(feats)).to(torch.bfloat16))
    finally:
        hf.model.multi_modal_projector = projector
    return torch.cat(out)


def cached_features(model, world: SceneWorld, split: str, n: int) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    wcfg = world.config()
    if split == "train":  # training scenes do not depend on the evaluation-scene knob
        wcfg.pop("eval_cooccur_p")
    key = json.dumps({"world": wcfg, "split": split, "n": n, "layer": model.hf.config.vision_feature_layer,
                      "dtype": "bf16-autocast", "v": 1}, sort_keys=True)
    path = cache_dir() / "scene-vlm-train" / f"features-{split}-{n}-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}.safetensors"
    if path.is_file():
        log(f"features: {path}")
        return load_file(str(path))["features"]
    log(f"computing tower features for {n} {split} scenes")
    t0 = time.time()
    feats = []
    for start in range(0, n, 64):
        scenes = world.scenes(split, min(64, n - start), start)
        feats.append(tower_features(model, [s.image for s in scenes]))
        if start % 512 == 0:
            log(f"  {start + len(scenes)}/{n} scenes, {time.time() - t0:.0f}s")
    feats = torch.cat(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous()}, str(path), metadata={"key": key})
    log(f"features done in {time.time() - t0:.0f}s -> {path}")
    return feats


# --- sequences -------------------------------------------------------------------------------------------------
class Packer:
    """Token ids, targets, positions and segment ids of one image with several exchanges (see module doc)."""

    def __init__(self, model):
        self.tok = model.tokenizer
        self.image_id = model.hf.config.image_token_id
        self.n_image = model.hf.config.image_seq_length
        self.prefix = self._ids("<|im_start|>user\n") + [self.image_id] * self.n_image + self._ids("\n")
        self._cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        for q, a in (("Is there a bag in the image?", YES), (CAPTION_PROMPT, "a red bag top left.")):  # self-check
            full = self._ids(f"<|im_start|>user\n{'<image>' * self.n_image}\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>")
            seg, _ = self.segment(q, a)
            if full != self.prefix + seg:
                raise RuntimeError("packed tokenization differs from the single-prompt tokenization")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def segment(self, q: str, a: str) -> tuple[list[int], list[int]]:
        """ids of "{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>" and the count of answer tokens (incl. the end)."""
        if (q, a) not in self._cache:
            head = self._ids(f"{q}<|im_end|>\n<|im_start|>assistant\n")
            answer = self._ids(f"{a}<|im_end|>")
            self._cache[(q, a)] = (head + answer, [len(head), len(answer)])
        return self._cache[(q, a)]

    def pack(self, exchanges: list[tuple[str, str]]) -> dict:
        ids, seg, pos = list(self.prefix), [0] * len(self.prefix), list(range(len(self.prefix)))
        targets = [-100] * len(self.prefix)
        exchange = [0] * len(self.prefix)
        for k, (q, a) in enumerate(exchanges, start=1):
            s_ids, (n_head, n_ans) = self.segment(q, a)
            base = len(ids)
            ids += s_ids
            seg += [k] * len(s_ids)
            pos += list(range(len(self.prefix), len(self.prefix) + len(s_ids)))
            targets += [-100] * len(s_ids)
            exchange += [0] * len(s_ids)
            for t in range(n_head, n_head + n_ans):  # the token before each answer token predicts it
                targets[base + t - 1] = s_ids[t]
                exchange[base + t - 1] = k
        return {"ids": ids, "seg": seg, "pos": pos, "targets": targets, "exchange": exchange}


def collate(packs: list[dict]) -> dict:
    length = max(len(p["ids"]) for p in packs)
    b = len(packs)
    ids = torch.zeros(b, length, dtype=torch.long)
    pos = torch.zeros(b, length, dtype=torch.long)
    targets = torch.full((b, length), -100, dtype=torch.long)
    seg = torch.full((b, length), -1, dtype=torch.long)
    weight = torch.zeros(b, length)
    for i, p in enumerate(packs):
        n = len(p["ids"])
        ids[i, :n], pos[i, :n] = torch.tensor(p["ids"]), torch.tensor(p["pos"])
        targets[i, :n], seg[i, :n] = torch.tensor(p["targets"]), torch.tensor(p["seg"])
        ex = torch.tensor(p["exchange"])
        counts = torch.bincount(ex)
        weight[i, :n] = torch.where(ex > 0, 1.0 / counts[ex].float(), torch.zeros(()))  # each exchange weighs 1
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    real = (seg >= 0)[:, None, :]
    mask = causal & same & real
    mask |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no all-masked rows)
    return {"ids": ids, "pos": pos, "targets": targets, "mask": mask[:, None], "weight": weight}


def exchanges_for(scene_classes: list[str], rng: random.Random, stage: int, n_questions: int) -> list[tuple[str, str]]:
    out = [(CAPTION_PROMPT, None)]
    if n_questions:
        present = list(scene_classes)
        absent = [c for c in CLASSES if c not in present]
        k = min(n_questions // 2, len(present))
        out += [(question(c), YES) for c in rng.sample(present, k)]
        out += [(question(c), NO) for c in rng.sample(absent, min(k if k else 1, len(absent)))]
    rng.shuffle(out)
    return out


def cell_labels(world: SceneWorld, split: str, n: int, grid: int) -> torch.Tensor:
    """[n, grid*grid] class index of the object covering the most of each image-token cell (`Scene.cell_cover`),
    else len(CLASSES) (background): the exact ground truth the grounding loss reads. Cells of faint objects are
    -1 (left out): the grounding loss names what is plainly visible and does not teach the projector to pick out
    the faint partners, which the language model should weigh against its prior, as in photos."""
    out = torch.full((n, grid * grid), len(CLASSES), dtype=torch.long)
    for i in range(n):
        scene = world.scene(split, i)
        cover = scene.cell_cover(grid)
        for k, obj in enumerate(scene.objects):
            out[i, torch.from_numpy(cover == k)] = -1 if obj.faint else CLASSES.index(obj.cls)
    return out


# --- model pieces ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model, weighting: str = "exchange"):
        self.weighting = weighting
        self.hf = model.hf
        self.lm = model.hf.model.language_model
        self.embed = self.lm.embed_tokens
        self.head = model.hf.lm_head
        self.projector = model.hf.model.multi_modal_projector
        self.image_id = model.hf.config.image_token_id
        self.yes, self.no = model.tokenizer.convert_tokens_to_ids(YES), model.tokenizer.convert_tokens_to_ids(NO)
        # grounding readout: the word embedding of each class name (its first token after a space) and of "nothing"
        words = [f" {c}" for c in CLASSES] + [" nothing"]
        ids = [model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"class words share first tokens: {dict(zip(words, ids))}")
        self.ground_ids = torch.tensor(ids)
        self.ground_weight = 0.0

    def grounding(self, img: torch.Tensor, labels: torch.Tensor, temperature: float = 10.0) -> tuple[torch.Tensor, int]:
        """Cross-entropy of each image token's cosine similarity to the class words' embeddings against the class
        of the object under it: image tokens that read, to the language model, like the words for what they show."""
        words = F.normalize(self.embed.weight[self.ground_ids].float(), dim=-1)
        logits = F.normalize(img.float(), dim=-1) @ words.T * temperature
        logits, labels = logits.flatten(0, 1), labels.flatten()
        keep = labels >= 0  # faint objects' cells are left out (see cell_labels)
        logits, labels = logits[keep], labels[keep]
        ce = F.cross_entropy(logits, labels, reduction="none")
        obj = labels < len(CLASSES)  # most cells are background: object cells weigh 1, background cells 0.25 together
        loss = ce[obj].mean() + 0.25 * ce[~obj].mean() if obj.any() else 0.25 * ce.mean()
        return loss, float((logits[obj].argmax(-1) == labels[obj]).float().mean()) if obj.any() else 0.0

    def loss(self, batch: dict, features: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        ids = batch["ids"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = self.embed(ids)
            img = self.projector(features.float())
            emb = emb.masked_scatter((ids == self.image_id)[..., None], img.to(emb.dtype))
            hidden = self.lm(inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["pos"],
                             use_cache=False).last_hidden_state
            sel = batch["targets"] != -100
            logits = self.head(hidden[sel]).float()
        targets = batch["targets"][sel]
        if self.weighting == "exchange":  # every exchange (a caption, a yes/no answer) weighs the same
            w = batch["weight"][sel]
            loss = (F.cross_entropy(logits, targets, reduction="none") * w).sum() / w.sum()
        else:
            loss = F.cross_entropy(logits, targets)
        pred = logits.argmax(-1)
        yn = (targets == self.yes) | (targets == self.no)
        info = {"tokens": int(sel.sum()), "correct": int((pred == targets).sum()),
                "yn": int(yn.sum()), "yn_correct": int((pred[yn] == targets[yn]).sum())}
        if self.ground_weight and labels is not None:
            g, g_acc = self.grounding(img, labels)
            loss = loss + self.ground_weight * g
            info |= {"ground": g_acc}
        return loss, info


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def run_stage(stage: int, trainer: Trainer, packer: Packer, classes: list[list[str]], feats: torch.Tensor,
              params: list[dict], steps: int, args, seed: int, labels: torch.Tensor | None = None) -> list[float]:
    opt = torch.optim.AdamW(params, weight_decay=0.0, betas=(0.9, 0.98))
    base_lrs = [g["lr"] for g in params]
    trainable = [p for g in params for p in g["params"]]
    order_rng = np.random.default_rng([seed, stage])
    order: list[int] = []
    losses, t0, ema, yn = [], time.time(), None, [0, 0]
    warmup = max(1, steps // 20)
    for step in range(steps):
        if len(order) < args.batch:
            order += order_rng.permutation(len(classes)).tolist()
        idx, order = order[:args.batch], order[args.batch:]
        rng = random.Random(seed * 1_000_003 + stage * 10_007 + step)
        packs = []
        for i in idx:
            ex = exchanges_for(classes[i], rng, stage, args.questions if stage == 2 else args.stage1_questions)
            packs.append(packer.pack([(q, a if a is not None else args.captions[i]) for q, a in ex]))
        batch = collate(packs)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * schedule(step, steps, warmup)
        loss, info = trainer.loss(batch, feats[idx], None if labels is None else labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        yn = [yn[0] + info["yn_correct"], yn[1] + info["yn"]]
        if step % 10 == 0 or step == steps - 1:
            el = time.time() - t0
            qa = f", yes/no acc (last 10 steps) {yn[0] / yn[1]:.2f}" if yn[1] else ""
            qa += f", grounding acc on object cells {info['ground']:.2f}" if "ground" in info else ""
            log(f"stage {stage} step {step + 1}/{steps} loss {loss.item():.3f} (ema {ema:.3f}) token acc "
                f"{info['correct'] / info['tokens']:.2f}{qa} | {el / (step + 1):.2f}s/step, {el / 60:.1f} min")
            yn = [0, 0]
    return losses


@torch.no_grad()
def validate(trainer: Trainer, packer: Packer, world: SceneWorld, feats: torch.Tensor, n: int, tok) -> dict:
    """Teacher-forced on `n` val scenes: caption token accuracy, and yes/no accuracy by comparing the logits of
    "Yes" and "No" at the answer position for every class (present and absent)."""
    yes, no = tok.convert_tokens_to_ids(YES), tok.convert_tokens_to_ids(NO)
    correct = total = cap_ok = cap_tok = 0
    for i in range(n):
        scene = world.scene("val", i)
        ex = [(CAPTION_PROMPT, scene.caption())] + [(question(c), YES if scene.has(c) else NO) for c in CLASSES]
        batch = collate([packer.pack(ex)])
        ids = batch["ids"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = trainer.embed(ids)
            emb = emb.masked_scatter((ids == trainer.image_id)[..., None], trainer.projector(feats[i:i + 1].float()).to(emb.dtype))
            hidden = trainer.lm(inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["pos"], use_cache=False).last_hidden_state
            logits = trainer.head(hidden[0]).float()
        targets = batch["targets"][0]
        sel = (targets != -100).nonzero().flatten().tolist()  # answer positions, exchange by exchange, caption first
        cap_n = packer.segment(CAPTION_PROMPT, scene.caption())[1][1]
        cap_pos, qa_pos = sel[:cap_n], sel[cap_n:]
        cap_ok += int((logits[cap_pos].argmax(-1) == targets[cap_pos]).sum())
        cap_tok += len(cap_pos)
        for j, c in enumerate(CLASSES):
            p = qa_pos[2 * j]  # each yes/no answer is 2 targets: the word and <|im_end|>
            said_yes = bool(logits[p, yes] > logits[p, no])
            correct += int(said_yes == scene.has(c))
            total += 1
    return {"scenes": n, "caption_token_acc": cap_ok / cap_tok, "yes_no_acc_all_classes": correct / total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(scene_vlm.WEIGHTS_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--questions", type=int, default=6, help="yes/no questions per scene in stage 2 (half yes, half no)")
    ap.add_argument("--stage1-questions", type=int, default=4, help="yes/no questions per scene in stage 1")
    ap.add_argument("--ground", type=float, default=1.0,
                    help="weight of the grounding loss (image tokens -> class-word embeddings of the object under them)")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--loss-weighting", choices=("exchange", "token"), default="exchange",
                    help="exchange: each answer (caption or yes/no) weighs the same; token: each answer token does")
    ap.add_argument("--stage1-steps", type=int, default=200)
    ap.add_argument("--stage2-steps", type=int, default=300)
    ap.add_argument("--lr1", type=float, default=1e-3, help="projector, stage 1")
    ap.add_argument("--lr2", type=float, default=3e-4, help="projector, stage 2")
    ap.add_argument("--lr-lora", type=float, default=5e-4)
    ap.add_argument("--val-scenes", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 64 scenes, 6+6 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.scenes, args.stage1_steps, args.stage2_steps, args.val_scenes = 64, 6, 6, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    model = scene_vlm.build(projector_seed=args.seed)
    hf = model.hf
    for p in hf.parameters():
        p.requires_grad_(False)
    world = SceneWorld(seed=args.world_seed)
    feats = cached_features(model, world, "train", args.scenes)
    val_feats = cached_features(model, world, "val", args.val_scenes)
    t_feats = time.time() - t_start
    log("loading training captions")
    classes = [list(world.classes_of("train", i)) for i in range(args.scenes)]
    args.captions = [world.scene("train", i).caption() for i in range(args.scenes)]
    packer, trainer = Packer(model), Trainer(model, args.loss_weighting)
    trainer.ground_weight = args.ground
    grid = int(round(hf.config.image_seq_length ** 0.5))
    labels = cell_labels(world, "train", args.scenes, grid) if args.ground else None
    if labels is not None:
        log(f"grounding labels: {grid}x{grid} cells, {float((labels < len(CLASSES)).float().mean()):.2f} covered by an object")

    projector = hf.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    t1 = time.time()
    loss1 = run_stage(1, trainer, packer, classes, feats, [{"params": list(projector.parameters()), "lr": args.lr1}],
                      args.stage1_steps, args, args.seed, labels)
    t1 = time.time() - t1
    val1 = validate(trainer, packer, world, val_feats, args.val_scenes, model.tokenizer)
    log(f"after stage 1: {val1}")
    from safetensors.torch import save_file

    stage1 = cache_dir() / "scene-vlm-train" / f"stage1-seed{args.seed}.safetensors"  # for inspection or restarts
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(stage1))

    targets = tuple(t for t in args.lora_targets.split(",") if t)
    lora = scene_vlm.add_lora(hf.model.language_model, targets=targets)
    lora_params = [p for m in lora.values() for p in (m.A, m.B)]
    t2 = time.time()
    loss2 = run_stage(2, trainer, packer, classes, feats,
                      [{"params": list(projector.parameters()), "lr": args.lr2}, {"params": lora_params, "lr": args.lr_lora}],
                      args.stage2_steps, args, args.seed, labels)
    t2 = time.time() - t2
    val2 = validate(trainer, packer, world, val_feats, args.val_scenes, model.tokenizer)
    log(f"after stage 2: {val2}")

    state = {f"projector.{k}": v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    for prefix, m in lora.items():
        state[f"{prefix}.A"], state[f"{prefix}.B"] = m.A.detach().float().contiguous(), m.B.detach().float().contiguous()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / scene_vlm.WEIGHTS_FILE), metadata={"format": "pt", "model": scene_vlm.NAME})
    record = {
        "model": scene_vlm.NAME, "base": {"vision": "dinov2-small", "language": "smollm2-135m"},
        "projector": {"type": "PooledProjector", "pool": scene_vlm.POOL, "image_tokens": hf.config.image_seq_length,
                      "vision_feature_layer": hf.config.vision_feature_layer},
        "lora": {"r": scene_vlm.LORA_RANK, "alpha": scene_vlm.LORA_ALPHA, "targets": list(targets)},
        "world": world.config(),
        "args": {k: v for k, v in vars(args).items() if k != "captions"},
        "seconds": {"features": round(t_feats, 1), "stage1": round(t1, 1), "stage2": round(t2, 1),
                    "total": round(time.time() - t_start, 1)},
        "loss": {"stage1_last50": float(np.mean(loss1[-50:])), "stage2_last50": float(np.mean(loss2[-50:]))},
        "val_teacher_forced": {"after_stage1": val1, "after_stage2": val2},
        "torch": torch.__version__, "threads": args.threads, "python": sys.version.split()[0],
    }
    (out / scene_vlm.CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out} ({sum(v.numel() for v in state.values()) * 4 / 1e6:.1f} MB) in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
