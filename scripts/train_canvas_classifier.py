"""Train the canvas classifier: frozen dinov2-small + a linear head on Fashion-MNIST canvases.

    python scripts/train_canvas_classifier.py            # ~12-15 min on one CPU thread

Features ([CLS ‖ mean patch] of the last hidden state, 768-d) are computed once per canvas with the backbone
frozen; the head is a linear layer trained full-batch with Adam and weight decay chosen on a held-out tenth of
the training canvases, then refitted on all of them. Feature standardisation is folded into the weights, so
the saved head reads raw features. Writes `src/attnscope/models/weights/canvas_fmnist_head.safetensors`
(30 KB) with the training record (sizes, seeds, accuracies) in its metadata. Deterministic for a given torch
build: canvases come from fixed seeds, and training is full-batch."""
from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import save_file

from attnscope.evaluate.canvas import CLASSES, WEIGHTS, CanvasHead, canvas_dataset
from attnscope.models.zoo import load


def features(model, items, batch: int = 32, label: str = "") -> torch.Tensor:
    out, start = [], time.perf_counter()
    for i in range(0, len(items), batch):
        x = model.encode(image=[it.image for it in items[i : i + batch]])
        with torch.no_grad():
            out.append(CanvasHead.features(model(**x).last_hidden_state))
        done = i + len(x["pixel_values"])
        if (i // batch) % 10 == 0 or done == len(items):
            rate = (time.perf_counter() - start) / done
            print(f"  {label} {done}/{len(items)} canvases, {rate:.3f} s each", flush=True)
    return torch.cat(out)


def fit(x: torch.Tensor, y: torch.Tensor, weight_decay: float, epochs: int = 600) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(CLASSES))
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(x), y).backward()
        opt.step()
    return linear


def accuracy(linear, x, y) -> float:
    with torch.no_grad():
        return float((linear(x).argmax(-1) == y).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load("dinov2-small")
    train = canvas_dataset("train", args.train_per_class, seed=0)
    test = canvas_dataset("test", args.test_per_class, seed=0)
    print(f"{len(train)} train and {len(test)} test canvases made in {time.perf_counter() - start:.0f} s", flush=True)
    xtr, xte = features(model, train, label="train"), features(model, test, label="test")
    ytr = torch.tensor([it.label for it in train])
    yte = torch.tensor([it.label for it in test])
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    ztr, zte = (xtr - mean) / std, (xte - mean) / std

    n_val = len(train) // 10
    scores = {}
    for wd in (1e-4, 1e-3, 1e-2):
        scores[wd] = accuracy(fit(ztr[n_val:], ytr[n_val:], wd), ztr[:n_val], ytr[:n_val])
        print(f"  weight decay {wd:g}: held-out accuracy {scores[wd]:.3f}", flush=True)
    best = max(scores, key=scores.get)
    linear = fit(ztr, ytr, best)
    train_acc, test_acc = accuracy(linear, ztr, ytr), accuracy(linear, zte, yte)

    head = CanvasHead()
    with torch.no_grad():  # fold the standardisation into the weights: W (x - m) / s + b
        head.linear.weight.copy_(linear.weight / std)
        head.linear.bias.copy_(linear.bias - (linear.weight * (mean / std)).sum(-1))
        folded = float((head(torch.cat([xte[:, None, :384], xte[:, None, 384:]], 1)).argmax(-1) == yte).float().mean())
    info = {"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "canvas": 224, "item_px": [56, 84],
            "train": len(train), "test": len(test), "seed": 0, "weight_decay": best, "heldout": scores,
            "train_accuracy": round(train_acc, 4), "test_accuracy": round(test_acc, 4),
            "folded_test_accuracy": round(folded, 4), "classes": list(CLASSES),
            "seconds": round(time.perf_counter() - start, 1), "threads": args.threads}
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, args.out,
              metadata={"attnscope": json.dumps(info)})
    print(json.dumps(info, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
