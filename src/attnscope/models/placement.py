"""Split a model across devices, the CPU and disk with accelerate (`device_map`, `max_memory`, `offload_folder`).

`attnscope.load(name, device_map=..., max_memory=..., offload_folder=...)` places a zoo model after loading it
(`split` below); a model directory passes the same keywords to `from_pretrained`, which loads each weight into its
place. Either way the model carries accelerate's `AlignDevicesHook`s: each placed module runs on its execution
device, and a module offloaded to "cpu" (on a GPU machine) or "disk" keeps its parameters on the meta device and
loads them from its weights map for each forward. attnscope's own hooks are forward (pre-)hooks registered with
torch, so they run outside accelerate's wrapper of `forward` (before it moves the inputs, after it moves the outputs
back); its tensors follow the query's device. Capture, steer (token pruning and contrastive branches included) and
explain on a split model equal the unsplit model (tests/test_split_models.py); the model's inputs go to
`Model.device`, the execution device of the first placed module."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import xxhash
from torch import nn

KEYWORDS = ("device_map", "max_memory", "offload_folder")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
INSTALL = "pip install 'attnscope[split]' (accelerate)"


class PlacementError(ValueError):
    """A device map attnscope cannot apply; the message names the fix."""


def _accelerate():
    try:
        import accelerate
    except ImportError as err:
        raise ImportError(f"splitting a model across devices needs accelerate: {INSTALL}") from err
    return accelerate


def is_split(hf: nn.Module) -> bool:
    """True if accelerate placed this model (a device map or any of its hooks)."""
    return bool(getattr(hf, "hf_device_map", None)) or any(hasattr(m, "_hf_hook") for m in hf.modules())


def check_options(device_map=None, max_memory=None, offload_folder=None) -> None:
    """The errors attnscope gives before anything is loaded or moved."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise PlacementError("max_memory and offload_folder place a model only with a device map; pass "
                                 "device_map='auto' (or an explicit {module: device} dict)")
        return
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise PlacementError(f"max_memory must be a {{device: size}} dict such as {{'cpu': '300MB'}} or {{0: '10GiB', "
                                 f"'cpu': '20GiB'}}; got {max_memory!r}")
        for device in max_memory:
            if device != "disk" and not _is_device(device):
                raise PlacementError(f"max_memory names {device!r}, which is not a device: use a GPU index, 'cuda:N' "
                                     "or 'cpu'")
    if isinstance(device_map, str):
        if device_map not in STRATEGIES and not _is_device(device_map):
            raise PlacementError(f"device_map={device_map!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a device; "
                                 "or pass a {module name: device} dict")
        return
    if not isinstance(device_map, dict) or not device_map:
        raise PlacementError(f"device_map must be a strategy name or a non-empty {{module name: device}} dict; got "
                             f"{type(device_map).__name__}")
    for name, device in device_map.items():
        if not _is_device(device):
            raise PlacementError(f"device_map[{name!r}] = {device!r} is not a device: use a GPU index, 'cuda:N', "
                                 "'cpu' or 'disk'")
    if "disk" in device_map.values() and offload_folder is None:
        raise PlacementError("device_map sends modules to 'disk'; pass offload_folder=DIR, where their weights are "
                             "written")


def _is_device(device) -> bool:
    if isinstance(device, torch.device) or (isinstance(device, int) and not isinstance(device, bool)):
        return _exists(torch.device("cuda", device) if isinstance(device, int) else device)
    if device in ("disk", "cpu"):
        return True
    try:
        return _exists(torch.device(device))
    except (RuntimeError, TypeError):
        return False


def _exists(device: torch.device) -> bool:
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PlacementError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s)")
        return True
    return device.type in ("cpu", "mps", "xpu", "npu")


def _explicit(hf: nn.Module, device_map: dict) -> dict:
    """The dict map checked against the model: every key names a module, every parameter and buffer is placed."""
    names = dict(hf.named_modules())
    unknown = [k for k in device_map if k not in names]
    if unknown:
        raise PlacementError(f"device_map names modules the model does not have: {unknown[:5]}; module names are "
                             f"dotted paths such as {[n for n in names if n][:4]}")
    placed = tuple(device_map)
    tensors = [n for n, _ in [*hf.named_parameters(), *hf.named_buffers()]]
    missing = [n for n in tensors if "" not in placed and not any(n.startswith(p + ".") for p in placed)]
    if missing:
        raise PlacementError(f"device_map leaves {len(missing)} weights unplaced (e.g. {missing[:3]}); add their "
                             "modules to the map, or use device_map='auto'")
    return dict(device_map)


def split(model, device_map="auto", max_memory: dict | None = None, offload_folder=None):
    """Place `model` (an attnscope `Model`, already loaded) with accelerate: a strategy ("auto", "balanced",
    "balanced_low_0", "sequential") within `max_memory` ({device: bytes or "300MB"}; what does not fit goes to
    "cpu", then "disk"), one device for all of it, or an explicit {module name: device} dict. Modules on "disk"
    are written to `offload_folder`. Returns the same `Model`; its weights fingerprint stays the same."""
    check_options(device_map, max_memory, offload_folder)
    accelerate = _accelerate()
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    hf = model.hf
    if is_split(hf):
        raise PlacementError(f"{model.name} is already placed with accelerate (hf_device_map); load it again to "
                             "place it differently")
    no_split = sorted(getattr(hf, "_no_split_modules", None) or [])
    if isinstance(device_map, str) and device_map in STRATEGIES:
        if device_map != "sequential":
            max_memory = get_balanced_memory(hf, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf, max_memory=max_memory, no_split_module_classes=no_split)
    elif isinstance(device_map, str) or not isinstance(device_map, dict):
        device_map = {"": device_map}
    if device_map == {"": "disk"}:  # accelerate offloads nothing for the root's name: place each child on disk
        device_map = {name: "disk" for name, _ in hf.named_children()}
    device_map = _explicit(hf, device_map)
    if "disk" in device_map.values() and offload_folder is None:
        raise PlacementError(f"{model.name} does not fit in max_memory={max_memory}; modules would go to 'disk': "
                             "pass offload_folder=DIR (or more max_memory)")
    if "disk" in device_map.values() and (Path(offload_folder) / "index.json").exists():
        _check_reused_folder(hf, device_map, Path(offload_folder))
    model.hf = accelerate.dispatch_model(hf, device_map, offload_dir=None if offload_folder is None else str(offload_folder))
    from .fingerprint import release  # the fingerprint reads offloaded weights through this module

    release(hf)  # the kept fingerprint's views would hold the storages the placement moved away
    return model


def _check_reused_folder(hf: nn.Module, device_map: dict, folder: Path) -> None:
    """accelerate does not write a folder that already holds an index.json: it reads the weights found there. Reuse
    it only if it holds exactly this model's weights for every module placed on disk (another process of the same run
    placing the same model, a rerun); refuse weights an earlier placement of other weights left there."""
    from accelerate.utils import OffloadedWeightsLoader

    disk = [name for name, device in device_map.items() if device == "disk"]
    state = hf.state_dict()
    names = [n for n in state if any(p == "" or n == p or n.startswith(p + ".") for p in disk)]
    try:
        stored_weights = OffloadedWeightsLoader(save_folder=str(folder))
        stale = [n for n in names if n not in stored_weights.index or not _same(stored_weights[n], state[n])]
    except (OSError, ValueError, KeyError) as err:
        stale = [f"unreadable ({type(err).__name__}: {err})"]
    if stale:
        raise PlacementError(f"offload_folder {str(folder)!r} already holds offloaded weights (index.json) that are not "
                             f"this model's (e.g. {stale[:2]}); accelerate would use them instead of the model's own: "
                             "pass an empty folder, or remove that one")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.detach().cpu())


def placement(hf: nn.Module) -> dict[str, int] | None:
    """How many placed modules each device holds ({"cpu": 20, "disk": 12}), or None for an unsplit model."""
    device_map = getattr(hf, "hf_device_map", None)
    if not device_map:
        return None
    out: dict[str, int] = {}
    for device in device_map.values():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        out[key] = out.get(key, 0) + 1
    return out


def _holders(model: nn.Module, name: str, modules: dict | None = None):
    """(weights map, the name in it) for parameter or buffer `name` (dotted, from `model`), from the nearest hooked
    module above it outwards; `modules`: `dict(model.named_modules(remove_duplicate=False))`, where the caller looks
    up many names."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:cut])
        module = (model.get_submodule(path) if cut else model) if modules is None else modules.get(path)
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is not None:
            yield weights, ".".join(parts[cut:])


def stored(model: nn.Module, name: str) -> torch.Tensor | None:
    """The real tensor behind parameter or buffer `name` (dotted, from `model`) that accelerate's offloading leaves on
    the meta device between forwards: read from the weights map of the nearest hooked module above it."""
    for weights, key in _holders(model, name):
        try:
            return weights[key]
        except KeyError:
            continue
    return None


def _source(weights, key: str):
    """Where `weights[key]` comes from, found without reading it: ("memory", tensor), ("file", path), None where
    `weights` does not hold `key`, "unknown" for a map of a kind not known here."""
    if hasattr(weights, "dataset") and isinstance(getattr(weights, "prefix", None), str):  # a PrefixedDataset
        return _source(weights.dataset, weights.prefix + key)
    if hasattr(weights, "index") and isinstance(getattr(weights, "state_dict", None), dict):  # OffloadedWeightsLoader
        if key in weights.state_dict:  # what accelerate holds in memory comes first, as its reads take it
            return "memory", weights.state_dict[key]
        info = weights.index.get(key)
        if info is None:
            return None
        return "file", info.get("safetensors_file") or os.path.join(weights.save_folder or "", f"{key}.dat")
    if isinstance(weights, dict):
        return ("memory", weights[key]) if key in weights else None
    return "unknown"


def stamp(model: nn.Module, name: str, modules: dict | None = None) -> tuple | None:
    """What tells that the stored bytes behind offloaded `name` changed: without reading them, a tensor the weights map
    holds in memory (accelerate's CPU offload) by identity, write counter and address, and a file (an offload folder's
    `.dat`, a checkpoint's safetensors file) by its inode, size and modification and change times. Where neither can
    be told (a weights map of a kind not known here, or a held tensor PyTorch counts no writes of: an inference
    tensor), a digest of the bytes themselves, read from the map as `stored` reads them (XXH3-128, every time the
    fingerprint is read, so an edit there is always seen; the cost is that tensor's bytes per read, not the whole
    model's). Not seen: a write PyTorch does not count (through `.data`) to a tensor held in memory, a file rewritten
    within the file system's timestamp granularity of the last read (`Model.refresh_fingerprint()` reads the bytes
    again). None where no weights map holds it (the fingerprint then says its weights are unavailable). `modules`:
    as `_holders` takes it."""
    for weights, key in _holders(model, name, modules):
        source = _source(weights, key)
        if source is None:
            continue
        if source == "unknown":
            try:
                source = "read", weights[key]
            except KeyError:  # as `stored` goes on to the next map out
                continue
        kind, where = source
        if kind != "file" and isinstance(where, torch.Tensor):
            try:
                return ("memory", id(where), where._version, where.data_ptr()) if kind == "memory" else _read(where)
            except RuntimeError:  # an inference tensor: no write counter
                return _read(where)
        if kind != "file" or not isinstance(where, (str, Path)):
            return ("unreadable", type(where).__name__)  # the hash fails on what `stored` gives: nothing is kept
        try:
            status = os.stat(where)
        except OSError:
            return ("file", str(where))
        return ("file", str(where), status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    return None


def _read(tensor: torch.Tensor) -> tuple:
    """A stamp read from the bytes: dtype, shape and their XXH3-128 digest."""
    t = tensor.detach().cpu().contiguous()
    digest = xxhash.xxh3_128()
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return ("bytes", str(t.dtype), tuple(t.shape), digest.hexdigest())


def resident(module: nn.Module, name: str, device: torch.device) -> torch.Tensor | None:
    """`module.<name>` on `device`, also where accelerate offloaded it: a forward hook of an offloaded module runs
    after accelerate's wrapper put its weights back on the meta device, so read them from its weights map."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor if tensor is None else tensor.to(device)
    real = stored(module, name)
    if real is None:
        raise PlacementError(f"{type(module).__name__}.{name} is on the meta device and no accelerate weights map "
                             "holds it; load the model with its weights (device_map / offload_folder) before use")
    return real.to(device)
