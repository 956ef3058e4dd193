"""Token-role builders: from model inputs to one TokenMap per stream and batch row."""
from __future__ import annotations

import torch

from ..core.tokens import TokenMap
from .spec import Spec


def _patch_grid(config, pixel_values: torch.Tensor) -> tuple[int, int]:
    patch = config.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


class TokenMapError(ValueError):
    """A token map that does not fit the sequence it would label."""


def has_cls(module) -> bool:
    """Whether a vision model's embeddings learn a class token (ViT/DINOv2 `cls_token`, CLIP `class_embedding`)."""
    return any(name.rsplit(".", 1)[-1] in ("cls_token", "class_embedding") for name, _ in module.named_parameters())


def prefix_roles(config, n: int | None = None, cls: bool = True) -> tuple[str, ...]:
    """Roles of the tokens before the patch grid: CLS if the embeddings have one, the registers the config
    declares, and "prefix" for any further token (a distillation token). `n` (the count the model really
    produced) overrides the count the config implies."""
    declared = ("cls",) * cls + ("register",) * int(getattr(config, "num_register_tokens", 0) or 0)
    if n is None:
        return declared
    return declared[:n] + ("prefix",) * max(0, n - len(declared))


def vision_map(config, pixel_values: torch.Tensor, cls: bool = True) -> TokenMap:
    """Prefix tokens (CLS, registers) then the patch grid, for ViT, DINOv2, CLIP, SigLIP towers at any resolution."""
    rows, cols = _patch_grid(config, pixel_values)
    return TokenMap.vision(rows, cols, prefix_roles(config, cls=cls))


def fit_vision_maps(tmaps: list[TokenMap], kv_len: int, model, where: str = "") -> list[TokenMap]:
    """Raster vision maps re-derived from the sequence length the embeddings really produced (`kv_len`): the
    tokens before the patch grid are whatever the model put there, never an assumed CLS."""
    grids = tmaps[0].grids
    if len(grids) != 1:
        raise TokenMapError(f"{where}the vision map of {len(tmaps[0])} positions does not fit the {kv_len} keys the "
                            "tower produced")
    rows, cols = grids[0]
    n = kv_len - rows * cols
    if n < 0:
        raise TokenMapError(f"{where}the tower produced {kv_len} tokens, fewer than its {rows}x{cols} patch grid: "
                            "a pooled or merged sequence attnscope does not map; pass `spec=` to attnscope.wrap")
    config = getattr(model.hf.config, "vision_config", model.hf.config)
    fitted = TokenMap.vision(rows, cols, prefix_roles(config, n, cls=model.vision_cls and n > 0))
    return [fitted.copy() for _ in tmaps]


def text_maps(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[TokenMap]:
    """Special, pad, system (inside a ChatML system turn) and text roles per position."""
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    maps = []
    keep = None
    if attention_mask is not None:  # it covers cached positions, then these ids: the last columns are the ids'
        width = input_ids.shape[1]
        if attention_mask.ndim != 2 or attention_mask.shape[1] < width:
            raise TokenMapError(f"the attention mask has shape {tuple(attention_mask.shape)} for input_ids of shape "
                                f"{tuple(input_ids.shape)}; attnscope labels padding from a 2D mask with a column per "
                                "cached and new token (a static or pre-allocated cache is not supported)")
        keep = attention_mask[:, attention_mask.shape[1] - width:].bool().tolist()  # one device read, not per token
    for row, ids in enumerate(input_ids.tolist()):
        pieces = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
        roles, turn = [], None
        for pos, (tid, piece) in enumerate(zip(ids, pieces)):
            if keep is not None and not keep[row][pos]:
                roles.append("pad")
            elif tid in special:
                roles.append("special")
                turn = None if piece == "<|im_end|>" else turn
            else:
                if pos > 0 and pieces[pos - 1] == "<|im_start|>":
                    turn = piece
                roles.append("system" if turn == "system" else "text")
        maps.append(TokenMap(roles, [str(p) for p in pieces]))
    return maps


def _merge_order(rows: int, cols: int, merge: int, image: int) -> list[tuple[int, int, int]]:
    """Qwen2-VL's vision sequence order: each merge x merge window is contiguous."""
    return [
        (image, rb * merge + i, cb * merge + j)
        for rb in range(rows // merge) for cb in range(cols // merge) for i in range(merge) for j in range(merge)
    ]


def _lm_grid(spec: Spec, config, grid: tuple[int, int]) -> tuple[int, int]:
    """The grid of an image's tokens as the language model sees them (after Qwen2-VL's patch merging)."""
    merge = config.vision_config.spatial_merge_size if spec.vision_order == "merge" else 1
    return grid[0] // merge, grid[1] // merge


def vision_maps(spec: Spec, config, inputs: dict, cls: bool = True) -> list[TokenMap]:
    """The vision tower's sequences: one map per image (raster towers), or one map over all images laid end
    to end in Qwen2-VL's merge-window order."""
    pixel_values = inputs["pixel_values"]
    if spec.vision_order == "merge":
        merge = config.vision_config.spatial_merge_size
        grids = [(int(h), int(w)) for _, h, w in inputs["image_grid_thw"].tolist()]
        patches = [p for k, (h, w) in enumerate(grids) for p in _merge_order(h, w, merge, k)]
        return [TokenMap(["image"] * len(patches), [f"patch({r},{c})" for _, r, c in patches], patches, grids)]
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        raise NotImplementedError("vision_feature_select_strategy='full' puts CLS among image tokens; not mapped yet")
    return [vision_map(config.vision_config, pixel_values, cls=cls)] * pixel_values.shape[0]


def vlm_maps(spec: Spec, config, tokenizer, inputs: dict, cls: bool = True) -> dict[str, list[TokenMap]]:
    """Language stream with each image's expanded token span mapped back to its grid, and the vision stream."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    language = text_maps(tokenizer, ids, mask)
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(config, "image_token_index", None)
    out = {"language": language}
    if inputs.get("pixel_values") is None:
        return out
    out["vision"] = vision_maps(spec, config, inputs, cls=cls)
    grids = out["vision"][0].grids if spec.vision_order == "merge" else [m.grids[0] for m in out["vision"]]
    lm_grids = [_lm_grid(spec, config, g) for g in grids]
    taken = 0  # grids are listed across the batch: row r's images follow those of earlier rows (each map counts from 0)
    for tmap, row_ids in zip(language, ids.tolist()):
        positions = [i for i, t in enumerate(row_ids) if t == image_id]
        tmap.grids, start = [], 0
        for k, (rows, cols) in enumerate(lm_grids[taken:]):
            span = positions[start : start + rows * cols]
            if len(span) < rows * cols:
                break
            for n, pos in enumerate(span):
                tmap.roles[pos], tmap.patch[pos] = "image", (k, n // cols, n % cols)
                tmap.tokens[pos] = f"patch({n // cols},{n % cols})"
            tmap.grids.append((rows, cols))
            start += rows * cols
        taken += len(tmap.grids)
    return out


def encoder_decoder_maps(tokenizer, inputs: dict) -> dict[str, list[TokenMap]]:
    """Encoder maps from `input_ids` (also the keys of "cross"), decoder maps from `decoder_input_ids`."""
    out: dict[str, list[TokenMap]] = {}
    if inputs.get("input_ids") is not None:
        out["encoder"] = text_maps(tokenizer, inputs["input_ids"], inputs.get("attention_mask"))
        out["cross"] = [t.copy() for t in out["encoder"]]
    if inputs.get("decoder_input_ids") is not None:
        out["decoder"] = text_maps(tokenizer, inputs["decoder_input_ids"], inputs.get("decoder_attention_mask"))
    elif inputs.get("labels") is not None:
        raise TokenMapError("an encoder-decoder forward without decoder_input_ids (labels only?): pass "
                            "decoder_input_ids so attnscope can label the decoder's positions")
    return out
