"""The probe `attnscope check` runs when given no inputs: built from the model's own tokenizer, image processor
or processor where it has them, else from its config (random token ids, random pixels of the config's image size).
A vision-language model without a processor needs its inputs passed (`check(model, inputs=...)`)."""
from __future__ import annotations

import torch

TEXT = "The quick brown fox jumps over the lazy dog, and the cat watches it from the wall."
IMAGE = "chelsea"
RANDOM_TOKENS = 12


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)[:2]


def random_pixels(config, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Pixel values [batch, channels, H, W] of the (vision) config's image size, fixed by `seed`."""
    vision = getattr(config, "vision_config", None) or config
    h, w = _image_size(vision)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(vision, "num_channels", 3), h, w, generator=g)


def _special_ids(config) -> set[int]:
    out = set()
    for cfg in (config, config.get_text_config() if hasattr(config, "get_text_config") else config):
        for name, value in vars(cfg).items():
            if name.endswith(("token_id", "token_index")) and isinstance(value, int):
                out.add(value)
    return out


def random_ids(config, length: int = RANDOM_TOKENS, seed: int = 0) -> torch.Tensor:
    """[1, length] token ids drawn below the vocabulary (and below 1000), avoiding every special id the config
    names (image, pad, bos, eos, decoder start)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if not vocab:
        raise ValueError(f"{type(config).__name__} names no vocab_size; pass inputs= to attnscope.check")
    special = _special_ids(config)
    pool = torch.tensor([i for i in range(3, min(int(vocab), 1000)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (1, length), generator=g)]


def _with_decoder(model, inputs: dict) -> dict:
    """An encoder-decoder forward needs decoder ids: the start token and a few of the source's tokens."""
    config = model.hf.config
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in inputs:
        return inputs
    start = getattr(config, "decoder_start_token_id", None)
    start = getattr(config, "pad_token_id", 0) if start is None else start
    ids = inputs["input_ids"]
    return inputs | {"decoder_input_ids": torch.cat([torch.full_like(ids[:, :1], start), ids[:, :4]], 1)}


def build(model) -> tuple[dict, str]:
    """(inputs on the model's device, a short description of the probe)."""
    kind, config = model.spec.kind, model.hf.config
    if kind == "vlm":
        inputs, about = _vlm(model)
    elif kind == "vision":
        if model.image_processor is not None:
            inputs, about = model.encode(image=IMAGE), f"photo {IMAGE!r} through the image processor"
        else:
            inputs, about = {"pixel_values": random_pixels(config)}, "random pixels of the config's image size"
    elif kind == "dual":
        ids = model.encode(TEXT)["input_ids"] if model.tokenizer is not None else random_ids(config)
        pixels = model.encode(image=IMAGE)["pixel_values"] if model.image_processor is not None else random_pixels(config)
        inputs, about = {"input_ids": ids, "pixel_values": pixels}, "a sentence and a photo (random where no processor)"
    elif model.tokenizer is not None:
        inputs, about = model.encode(TEXT), f"{TEXT!r} through the tokenizer"
    else:
        ids = random_ids(config)
        inputs, about = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, f"{ids.shape[1]} random token ids"
    inputs = _with_decoder(model, dict(inputs))
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}, about


def _vlm(model) -> tuple[dict, str]:
    if hasattr(model, "prompt"):  # a zoo VLM with its own chat prompt
        return model.encode(model.prompt(TEXT), IMAGE), f"chat prompt with photo {IMAGE!r}"
    if model.processor is None:
        raise ValueError(f"{model.name} is a vision-language model without a processor, so attnscope cannot build a "
                         "probe with the right number of image tokens; pass inputs= to attnscope.check (input_ids "
                         "with the image tokens, pixel_values, and what else its forward needs)")
    text = None
    template = getattr(model.processor, "chat_template", None)
    if template:
        content = [{"type": "image"}, {"type": "text", "text": TEXT}]
        text = model.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if text is None:
        token = getattr(model.processor, "image_token", None)
        if token is None:
            raise ValueError(f"{model.name}'s processor has no chat template and names no image token; pass inputs= to "
                             "attnscope.check")
        text = f"{token}\n{TEXT}"
    return model.encode(text, IMAGE), f"chat prompt with photo {IMAGE!r} through the processor"
