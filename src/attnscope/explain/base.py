"""Shared pieces of the explanation methods: pixel geometry, building the `Explanation`, the input leaf that
pixel/embedding-gradient methods differentiate, and batch expansion for perturbed or interpolated inputs."""
from __future__ import annotations

import torch

from .engine import MethodError, Pass
from .explanation import Explanation


def _config_patch(config):
    patch = getattr(config, "patch_size", None)
    if patch is None and getattr(config, "vision_config", None) is not None:
        patch = getattr(config.vision_config, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        return int(patch[0]), int(patch[-1])
    return (int(patch), int(patch)) if patch else None


def pixel_geometry(model, inputs: dict, stream: str):
    """(pixel_size (H, W), patch (ph, pw)) of the image input, or (None, None) when there is no raster image
    (text models; Qwen2-VL's flattened patches)."""
    pv = inputs.get("pixel_values")
    if pv is None or pv.dim() != 4:
        return None, None
    patch = _config_patch(model.hf.config)
    if model.spec.vision_order == "merge":
        return None, None
    if model.spec.kind == "vlm" and stream != "vision":
        patch = None  # a language-model image token covers pixel size / its own grid (pooled projectors: 2x2 patches)
    return (int(pv.shape[-2]), int(pv.shape[-1])), patch


def make(model, inputs: dict, p: Pass | None, stream: str, method: str, params: dict, scores: torch.Tensor,
         tmap=None, pixel_scores=None, extras: dict | None = None, target=None, value=None) -> Explanation:
    tmap = tmap if tmap is not None else p.tokens[stream][0]
    target = target if target is not None else p.target
    value = value if value is not None else p.value
    pixel_size, patch = pixel_geometry(model, inputs, stream)
    scores = scores.detach().cpu()  # every method's scores on the CPU, whatever devices the model uses
    pixel_scores = None if pixel_scores is None else pixel_scores.detach().cpu()
    return Explanation(method, dict(params), scores, tmap, stream, target.describe(), float(value.detach()[0]),
                       model.name, pixel_size, patch, pixel_scores, None, None, extras or {},
                       _model=model, _inputs=inputs, _target=target)


def check_single(inputs: dict) -> None:
    for key in ("input_ids", "pixel_values", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] != 1 and not (
                key == "pixel_values" and inputs.get("input_ids") is not None):
            raise MethodError(f"explain one input at a time: `{key}` has batch size {value.shape[0]}; loop over the rows")


def expand(inputs: dict, batch: int) -> dict:
    """Repeat batch-1 tensors (masks, ids, pixels) to `batch` rows."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1 and batch != 1:
            out[key] = value.expand(batch, *value.shape[1:])
        else:
            out[key] = value
    return out


def input_leaf(model, inputs: dict, stream: str) -> tuple[str, torch.Tensor, dict]:
    """The tensor that pixel/embedding-gradient methods attribute to: `pixel_values` when the explained stream
    sees an image (vision models; the image part of a VLM), else the token embeddings (`inputs_embeds`).
    Returns (name, tensor, the other inputs)."""
    if inputs.get("pixel_values") is not None and (stream == "vision" or model.spec.kind == "vlm"):
        if inputs["pixel_values"].dim() != 4:
            raise MethodError("pixel attributions need a raster image input [B, 3, H, W]; this model takes flattened "
                              "patches (Qwen2-VL)")
        rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
        return "pixel_values", inputs["pixel_values"].detach().float(), rest
    ids = inputs.get("input_ids")
    if ids is None:
        raise MethodError("nothing to attribute to: the inputs have neither pixel_values nor input_ids")
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        embeds = embed(ids)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    return "inputs_embeds", embeds.detach(), rest


def reduce_to_tokens(model, inputs: dict, stream: str, name: str, attribution: torch.Tensor, tmap):
    """Token scores from an attribution over the input leaf: embeddings summed over width; pixels summed over
    each patch's pixels (and the pixel map summed over channels). Returns (scores [N], pixel map or None)."""
    attribution = attribution.detach().float().cpu()
    if name == "inputs_embeds":
        return attribution[0].sum(-1), None
    pixel_map = attribution[0].sum(0)  # [H, W]
    scores = torch.zeros(len(tmap))
    (height, width), patch = pixel_geometry(model, inputs, stream)
    if patch is None and tmap.grids:  # a VLM's language stream: each image token covers pixel size / its grid
        rows, cols = tmap.grids[0]
        patch = (height // rows, width // cols)
    if patch is None or not tmap.grids:
        raise MethodError("cannot place pixel attributions on tokens: no patch grid")
    ph, pw = patch
    for pos, where in enumerate(tmap.patch):
        if where is None or where[0] != 0:
            continue
        _, r, c = where
        scores[pos] = pixel_map[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].sum()
    return scores, pixel_map


def blurred(pixels: torch.Tensor, sigma: float = 8.0) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] (separable, reflect padding): the 'blur' baseline of perturbation tests and IG."""
    radius = max(1, int(3 * sigma))
    x = pixels.new_tensor(list(range(-radius, radius + 1)), dtype=torch.float32)  # on the pixels' device
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(pixels.dtype)
    channels = pixels.shape[1]
    out = pixels
    pad_h = min(radius, pixels.shape[-2] - 1)
    pad_w = min(radius, pixels.shape[-1] - 1)
    k_h = kernel[radius - pad_h : radius + pad_h + 1]
    k_w = kernel[radius - pad_w : radius + pad_w + 1]
    out = torch.nn.functional.pad(out, (0, 0, pad_h, pad_h), mode="reflect")
    out = torch.nn.functional.conv2d(out, (k_h / k_h.sum()).view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    out = torch.nn.functional.pad(out, (pad_w, pad_w, 0, 0), mode="reflect")
    out = torch.nn.functional.conv2d(out, (k_w / k_w.sum()).view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return out
