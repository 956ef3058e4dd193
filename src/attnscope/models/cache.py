"""Where converted zoo weights are cached, and how weight packages are found without importing them."""
from __future__ import annotations

import functools
import importlib.util
import os
import threading
from pathlib import Path

CACHE_ENV = "ATTNSCOPE_CACHE"


class MissingWeightsError(RuntimeError):
    """A zoo model's weight package is not installed."""


def cache_dir() -> Path:
    """Cache root: `$ATTNSCOPE_CACHE`, else `~/.cache/attnscope`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnscope"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(module: str, relpath: str, pip_install: str) -> Path:
    """Path of `relpath` inside installed package `module`, located without importing it.

    `pip_install` is the command that installs the package; it is quoted in the error."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"weight package `{module}` is not installed; run: {pip_install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise MissingWeightsError(f"`{path}` is missing from package `{module}`; reinstall it: {pip_install}")
    return path


_LOAD_LOCK = threading.RLock()


def serial_load(fn):
    """Run a model loader under one process-wide lock: transformers' `from_pretrained` builds models under
    process-global patches (meta-device init, patched torch creation ops), so two loads in two threads (the
    viewer's worker and the caller, say) can corrupt each other, e.g. leave a tied weight on the meta device."""
    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with _LOAD_LOCK:
            return fn(*args, **kwargs)
    return locked

