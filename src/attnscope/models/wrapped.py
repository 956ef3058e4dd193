"""`Model`: a Hugging Face model with its processor, architecture spec, attention-site map and role builder."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core.sites import Site, find_sites
from ..core.tokens import TokenMap
from . import roles
from .fingerprint import fingerprint as weights_fingerprint, forget as forget_fingerprint, frozen as frozen_fingerprint
from .images import load_image
from .spec import Spec, spec_for


class Model:
    """Callable like the wrapped model: `model(**inputs)` and `model.generate(...)` go to `model.hf`."""

    def __init__(self, hf: nn.Module, tokenizer=None, image_processor=None, processor=None, name: str | None = None,
                 spec: Spec | None = None, attention_modules: list[str] | None = None, extras: dict | None = None):
        if not hasattr(hf, "config"):
            raise TypeError(f"attnscope wraps transformers models (they carry a `config`); got {type(hf).__name__}")
        self.hf = hf.eval()
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.image_processor = image_processor if image_processor is not None else getattr(processor, "image_processor", None)
        self.processor = processor
        self.name = name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__
        self.spec = spec or spec_for(hf.config, hf)
        self.extras = extras or {}
        self.sites: dict[nn.Module, Site] = find_sites(hf, self.spec.streams, attention_modules, self.spec.cross)
        self._signature = inspect.signature(hf.forward)
        self.vision_cls = roles.has_cls(hf)

    def __repr__(self) -> str:
        layers = ", ".join(f"{s}: {n} layers" for s, n in self.streams.items())
        return f"Model({self.name!r}, {type(self.hf).__name__}, {layers})"

    def __call__(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.hf.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device of an offloaded model (accelerate hooks), else its weights'."""
        for module in self.hf.modules():
            dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if dev is not None:
                return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        return next(self.hf.parameters()).device

    @property
    def streams(self) -> dict[str, int]:
        """Stream name → number of attention layers."""
        out: dict[str, int] = {}
        for site in self.sites.values():
            out[site.stream] = max(out.get(site.stream, 0), site.layer + 1)
        return out

    def site(self, stream: str, layer: int) -> Site:
        for site in self.sites.values():
            if site.stream == stream and site.layer == layer:
                return site
        raise KeyError(f"no site ({stream}, {layer}); streams: {self.streams}")

    @property
    def fingerprint(self) -> str:
        """blake2b over parameter and buffer (non-persistent ones too, RoPE's `inv_freq`) names, shapes, dtypes and
        bytes: identifies the weights a trace came from. Tensors only: a module's other attributes (RoPE's
        `attention_scaling`, an attention's `scaling`), its class and code are not in it.
        Hashed again only when the weights changed (an optimizer step, `load_state_dict`, an in-place write), which
        is told without reading them (`models/fingerprint.py`); `refresh_fingerprint()` forces a new hash."""
        return weights_fingerprint(self.hf)

    def frozen_weights(self):
        """`with model.frozen_weights():` the weights are declared unchanged inside but for writes PyTorch counts, so
        the fingerprint every capture block reads at its end skips its sampled-bytes copy, and the full check runs at
        the block's two ends (a write through `.data` inside raises `WeightsChangedError` there). For dataset-scale
        runs with one capture per item (`models/fingerprint.py:frozen`)."""
        return frozen_fingerprint(self.hf)

    def refresh_fingerprint(self) -> str:
        """Hash every byte again (after a write the cheap check cannot see: a few elements changed through `p.data`)."""
        forget_fingerprint(self.hf)
        return self.fingerprint

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Forward arguments by name, whether passed positionally or not."""
        try:
            bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)
        for param in self._signature.parameters.values():
            if param.kind is param.VAR_KEYWORD and param.name in bound:
                bound |= bound.pop(param.name)
        return bound

    @property
    def image_token(self) -> str | None:
        """The placeholder a vision-language prompt marks the image with (`<image>`), or None."""
        token = getattr(self.processor, "image_token", None)
        return token if isinstance(token, str) and self.spec.kind == "vlm" else None

    def chat_prompt(self, text: str, images: int = 0) -> str:
        """`text` as one user turn of the model's chat template, with `images` image placeholders before it where
        the processor expects them, ending with the assistant's turn (ready for generation)."""
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if owner is None or not getattr(owner, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template; pass chat=False (the text is the prompt as typed)")
        if images and self.image_token is None:
            raise ValueError(f"{self.name} is not a vision-language model; it cannot put an image in a chat prompt")
        if owner is self.processor:
            content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        else:
            content = text
        return owner.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)

    def encode(self, text: str | list[str] | None = None, image=None, chat: bool | None = None, **kwargs) -> dict:
        """Model inputs for text and/or an image (photo name, path, PIL image or array), on the model's device.

        `chat`: wrap `text` in the model's chat template (`chat_prompt`). The default (None) does so where the
        prompt would not work otherwise: a vision-language model given text and an image gets the chat prompt with
        the image placeholder, unless the text already holds the placeholder (`<image>`): then it is a raw prompt,
        used as typed. `chat=False` always uses the text as typed; `chat=True` also wraps text-only prompts."""
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or any(not t.strip() for t in texts):
                raise ValueError("text is empty; pass at least one non-blank string")
        if text is None and image is None:
            raise ValueError("nothing to encode; pass text=... and/or image=...")
        images = None if image is None else [load_image(i) for i in (image if isinstance(image, list) else [image])]
        marker = self.image_token
        if chat is False and images is not None and text is not None and marker is not None:
            missing = [t for t in texts if marker not in t]
            if missing:
                raise ValueError(f"a raw prompt (chat=False / --raw-prompt) must hold the image placeholder {marker!r} "
                                 f"where the image goes; {missing[0][:60]!r} has none. Write it yourself (e.g. "
                                 f"'{marker}\\n{missing[0][:30]}'), or leave chat unset to build the model's own prompt")
        if text is not None and chat is not False:
            marker = self.image_token
            wrap = chat is True or (images is not None and marker is not None)
            if wrap and not (chat is None and marker is not None and any(marker in t for t in texts)):
                n = len(images) if images is not None and marker is not None else 0
                texts = [self.chat_prompt(t, n if len(texts) == 1 else 1 if n else 0) for t in texts]
                text = texts[0] if isinstance(text, str) else texts
                kwargs.setdefault("add_special_tokens", False)
        if text is not None and len(texts) > 1 and self.spec.kind in ("text", "vlm") and _generates(self.hf):
            kwargs.setdefault("padding_side", "left")  # a batch for generate: every row's last token is its own
            kwargs.setdefault("padding", True)
        if self.processor is not None and images is not None and text is not None:
            batch = self.processor(text=text, images=images, return_tensors="pt", **kwargs)
        elif images is not None:
            if self.image_processor is None:
                raise ValueError(f"{self.name} was given no image processor, so it cannot encode images: pass text=..., "
                                 "or wrap it with one: attnscope.wrap(hf_model, image_processor=AutoImageProcessor"
                                 ".from_pretrained(...))")
            kwargs.pop("add_special_tokens", None)
            batch = self.image_processor(images=images, return_tensors="pt", **kwargs)
        else:
            if self.tokenizer is None:
                raise ValueError(f"{self.name} was given no tokenizer, so it cannot encode text: pass image=..., or wrap "
                                 "it with one: attnscope.wrap(hf_model, tokenizer=AutoTokenizer.from_pretrained(...))")
            batch = self.tokenizer(text, return_tensors="pt", **({"padding": True} | kwargs))
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def vision_token_maps(self, inputs: dict) -> dict[str, list[TokenMap]]:
        """The vision stream's maps alone (a VLM's tower run before the language model sees the prompt)."""
        if inputs.get("pixel_values") is None:
            return {}
        return {"vision": roles.vision_maps(self.spec, self.hf.config, inputs, cls=self.vision_cls)}

    def token_maps(self, inputs: dict) -> dict[str, list[TokenMap]]:
        """One TokenMap per stream and batch row for these forward inputs (unknown roles where not derivable)."""
        kind, config = self.spec.kind, self.hf.config
        if kind == "encdec":
            return roles.encoder_decoder_maps(self.tokenizer, inputs)
        if kind == "vlm" and inputs.get("input_ids") is not None:
            return roles.vlm_maps(self.spec, config, self.tokenizer, inputs, cls=self.vision_cls)
        out: dict[str, list[TokenMap]] = {}
        if inputs.get("pixel_values") is not None and kind in ("vision", "dual"):
            pv = inputs["pixel_values"]
            vision_config = getattr(config, "vision_config", config)
            out["vision"] = [roles.vision_map(vision_config, pv, cls=self.vision_cls)] * pv.shape[0]
        if inputs.get("input_ids") is not None and kind in ("text", "dual"):
            out["text"] = roles.text_maps(self.tokenizer, inputs["input_ids"], inputs.get("attention_mask"))
        return out


def _generates(hf) -> bool:
    """A decoder that continues its input (generate pads a batch on the left)."""
    can = getattr(hf, "can_generate", None)
    return bool(can()) if callable(can) else False
