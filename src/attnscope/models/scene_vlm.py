"""Zoo model `scene-vlm`: a LLaVA-1.5-class vision-language model made of the zoo's `dinov2-small` tower and
`smollm2-135m` language model, joined by a small trained projector and LoRA, trained on the scene world.

Architecture (Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5), 2023): a
`transformers.LlavaForConditionalGeneration` whose vision tower is DINOv2-S/14 (frozen, features of its
penultimate layer, CLS dropped: `vision_feature_layer=-2`, strategy "default") and whose language model is
SmolLM2-135M-Instruct. The projector is LLaVA-1.5's two-layer GELU MLP preceded by a 2x2 patch merge:

* **64 image tokens, not 256.** A 224x224 image gives DINOv2 a 16x16 patch grid. The projector concatenates
  each 2x2 block of neighbouring patch features (384 -> 1536 channels, lossless: a "pixel shuffle" as in
  SmolVLM/Idefics3 and Qwen2-VL's merger), normalises it (LayerNorm) and maps it with the MLP to the LM's
  576-d embeddings: an 8x8 grid of 64 tokens in row-major order. Scene objects fill a 75 px cell, i.e. a
  2.7x2.7 block of merged tokens, so nothing the captions name is lost; the language model reads 4x fewer
  image positions, which makes training on a 2-core CPU fit in an hour and every evaluated answer ~3x
  cheaper (prefill of ~80 instead of ~270 tokens).
* **Token roles.** attnscope's LLaVA role builder takes the image-token grid from the tower's patch grid. The
  config carries `image_grid_pool=2`, and `SceneVLM.token_maps` maps each of the 64 image positions to its
  (row, col) on the 8x8 grid (pooled token (r, c) covers tower patches 2r..2r+1 x 2c..2c+1).
* **Image token.** `<image>` reuses SmolLM2's unused special token id 16 (`<empty_output>`, renamed in a
  copy of the tokenizer), so the vocabulary, embeddings and tied LM head stay the zoo's exactly.
* **LoRA** (Hu et al., 2021) of rank 8 on q_proj and v_proj of all 30 layers, trained in stage 2 and merged
  into the weights at load: the loaded model is a plain LlavaForConditionalGeneration.

Only the projector and the LoRA factors are stored (`weights/scene_vlm/`, about 7 MB); the tower and the LM
come from the zoo at load. `scripts/train_scene_vlm.py` trains them from a seed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..core.tokens import TokenMap
from .cache import serial_load
from .wrapped import Model

NAME = "scene-vlm"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "scene_vlm"
WEIGHTS_FILE, CONFIG_FILE = "scene_vlm.safetensors", "scene_vlm.json"
TRAIN_SCRIPT = "python scripts/train_scene_vlm.py"

IMAGE_TOKEN, REPLACED_TOKEN = "<image>", "<empty_output>"
POOL = 2
FEATURE_LAYER = -2
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
IMAGE_SIZE = 224
SYSTEM_FREE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PooledProjector(nn.Module):
    """LLaVA-1.5's MLP projector after a 2x2 patch merge: [B, h*w, C] tower patches (row-major) ->
    [B, (h/2)*(w/2), D] language-model embeddings (row-major over the pooled grid).

    merge (2x2 neighbours concatenated, C -> 4C) -> LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)."""

    def __init__(self, vision_dim: int = 384, text_dim: int = 576, pool: int = POOL):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(vision_dim * pool * pool)
        self.linear_1 = nn.Linear(vision_dim * pool * pool, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def merge(self, features: torch.Tensor) -> torch.Tensor:
        b, n, c = features.shape
        side = math.isqrt(n)
        if side * side != n or side % self.pool:
            raise ValueError(f"{n} patch features are not a square grid divisible by {self.pool}; scene-vlm takes "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE} images (a 16x16 grid)")
        p, s = self.pool, side // self.pool
        x = features.reshape(b, s, p, s, p, c).permute(0, 1, 3, 2, 4, 5)  # [B, row, col, dy, dx, C]
        return x.reshape(b, s * s, p * p * c)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(self.merge(features)))))


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) * B(A(x))` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros): LoRA
    (Hu et al., 2021). Used during training; at load the product is merged into the base weight."""

    def __init__(self, base: nn.Linear, r: int = LORA_RANK, alpha: float = LORA_ALPHA):
        super().__init__()
        self.base, self.r, self.scale = base, r, alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


def add_lora(language_model: nn.Module, r: int = LORA_RANK, alpha: float = LORA_ALPHA,
             targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, LoRALinear]:
    """Wrap the target projections of every decoder layer in `LoRALinear`; returns them by state-dict prefix."""
    out = {}
    for i, layer in enumerate(language_model.layers):
        for name in targets:
            wrapped = LoRALinear(getattr(layer.self_attn, name), r, alpha)
            setattr(layer.self_attn, name, wrapped)
            out[f"lora.layers.{i}.{name}"] = wrapped
    return out


def remove_lora(language_model: nn.Module, merge: bool = True) -> None:
    """Put plain `nn.Linear`s back, with the LoRA product merged into their weights if `merge`."""
    for layer in language_model.layers:
        for name, module in list(layer.self_attn.named_children()):
            if isinstance(module, LoRALinear):
                if merge:
                    with torch.no_grad():
                        module.base.weight += (module.B @ module.A) * module.scale
                setattr(layer.self_attn, name, module.base)


def merge_lora(language_model: nn.Module, state: dict[str, torch.Tensor], r: int, alpha: float,
               targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Add `(alpha / r) * B @ A` of each stored LoRA pair into its projection's weight; returns pairs merged."""
    merged = 0
    with torch.no_grad():
        for i, layer in enumerate(language_model.layers):
            for name in targets:
                a, b = state.get(f"lora.layers.{i}.{name}.A"), state.get(f"lora.layers.{i}.{name}.B")
                if a is None or b is None:
                    continue
                weight = getattr(layer.self_attn, name).weight
                weight += (b.float() @ a.float()).to(weight.dtype) * (alpha / r)
                merged += 1
    return merged


def image_tokenizer(tokenizer):
    """A copy of SmolLM2's tokenizer in which unused special token 16 (`<empty_output>`) reads `<image>`."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    (entry,) = [t for t in data["added_tokens"] if t["content"] == REPLACED_TOKEN]
    entry["content"] = IMAGE_TOKEN
    vocab = data["model"]["vocab"]
    vocab[IMAGE_TOKEN] = vocab.pop(REPLACED_TOKEN)
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    out = type(tokenizer)(tokenizer_object=Tokenizer.from_str(json.dumps(data)), **special)
    out.chat_template = SYSTEM_FREE_TEMPLATE
    if out.convert_tokens_to_ids(IMAGE_TOKEN) != entry["id"] or len(out.tokenize(IMAGE_TOKEN)) != 1:
        raise RuntimeError("could not map <image> onto SmolLM2's token 16; is the zoo tokenizer changed?")
    return out


class SceneVLM(Model):
    """`Model` for scene-vlm: its language-stream token maps put the 64 pooled image tokens on the 8x8 grid."""

    @property
    def pool(self) -> int:
        return int(getattr(self.hf.config, "image_grid_pool", 1) or 1)

    def token_maps(self, inputs: dict) -> dict[str, list[TokenMap]]:
        maps = super().token_maps(inputs)
        if self.pool == 1 or not maps.get("vision") or "input_ids" not in inputs:
            return maps
        image_id = self.hf.config.image_token_id
        rows, cols = maps["vision"][0].grids[0]
        rows, cols = rows // self.pool, cols // self.pool
        for tmap, ids in zip(maps["language"], inputs["input_ids"].tolist()):
            if "image" in tmap.roles:  # the role builder already knows the pooled grid
                continue
            positions = [i for i, t in enumerate(ids) if t == image_id]
            tmap.grids = []
            for k in range(len(positions) // (rows * cols)):
                for n, pos in enumerate(positions[k * rows * cols:(k + 1) * rows * cols]):
                    tmap.roles[pos], tmap.patch[pos] = "image", (k, n // cols, n % cols)
                    tmap.tokens[pos] = f"patch({n // cols},{n % cols})"
                tmap.grids.append((rows, cols))
        return maps

    def prompt(self, text: str, image: bool = True) -> str:
        """The chat prompt for one user turn (with the image first), ready for generation: `Model.chat_prompt`,
        which `encode(text, image=...)` applies by itself."""
        return self.chat_prompt(text, 1 if image else 0)

    @torch.no_grad()
    def ask(self, image, text: str, max_new_tokens: int = 48, **generate_kwargs) -> str:
        """Greedy answer to one question about one image (no chat history)."""
        inputs = self.encode(self.prompt(text), image)
        out = self.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@serial_load
def build(cache: Path | None = None, projector_seed: int = 0) -> SceneVLM:
    """scene-vlm from the zoo parts with a randomly initialised projector (seeded) and no LoRA: the starting
    point of training, and an untrained model for testing mechanics."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from . import dinov2_onnx, smollm2_gguf
    from .cache import cache_dir

    cache = Path(cache) if cache is not None else cache_dir()
    tower, image_processor, _ = dinov2_onnx.load(cache)
    lm, tokenizer = smollm2_gguf.load(cache)
    tokenizer = image_tokenizer(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    grid = IMAGE_SIZE // tower.config.patch_size
    config = LlavaConfig(vision_config=tower.config, text_config=lm.config, image_token_id=image_id,
                         vision_feature_layer=FEATURE_LAYER, vision_feature_select_strategy="default",
                         image_seq_length=(grid // POOL) ** 2, tie_word_embeddings=True, projector_hidden_act="gelu")
    config.image_grid_pool = POOL  # read by SceneVLM.token_maps (and by roles._lm_grid once it honours it)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    torch.manual_seed(projector_seed)
    hf.model.vision_tower = tower
    hf.model.language_model = lm.model
    hf.lm_head = lm.lm_head
    hf.model.multi_modal_projector = PooledProjector(tower.config.hidden_size, lm.config.hidden_size, POOL)
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"scene-vlm assembly left tensors unset: {meta[:5]}")
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hf.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=None, do_sample=False,
                                            max_new_tokens=48)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.config.patch_size * POOL,
                               vision_feature_select_strategy="default", chat_template=SYSTEM_FREE_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return SceneVLM(hf.eval(), processor=processor, name=NAME)


@serial_load
def load(weights_dir: Path | str | None = None, cache: Path | None = None) -> SceneVLM:
    """scene-vlm with its trained projector and LoRA (merged) from `weights_dir` (default: the package's)."""
    from safetensors.torch import load_file

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    weights, meta = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not meta.is_file():
        raise FileNotFoundError(f"scene-vlm's trained weights are not in {folder} ({WEIGHTS_FILE}, {CONFIG_FILE}); "
                                f"train them with `{TRAIN_SCRIPT}` (about an hour on 2 CPU cores)")
    info = json.loads(meta.read_text())
    model = build(cache)
    state = load_file(str(weights))
    projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    model.hf.model.multi_modal_projector.load_state_dict(projector)  # strict: names and shapes
    lora = info.get("lora") or {}
    if lora:
        n = merge_lora(model.hf.model.language_model, state, int(lora["r"]), float(lora["alpha"]), tuple(lora["targets"]))
        expected = len(model.hf.model.language_model.layers) * len(lora["targets"])
        if n != expected:
            raise ValueError(f"{weights} holds {n} LoRA pairs; expected {expected}")
    model.extras["training"] = info
    return model
