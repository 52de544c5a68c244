"""Training checkpoints: tensors in safetensors, a small JSON state, both written atomically.

A checkpoint named ``last`` (or ``best``) is ``<name>.json`` pointing at a tensor file
``<name>-<iteration>.safetensors`` beside it. The tensor file is written (and fsync'ed) first,
then the JSON replaces the previous one in one ``os.replace``, and only then is the old tensor
file removed: a crash at any point leaves a complete, consistent checkpoint.
"""
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


class CheckpointStateError(RuntimeError):
    """A training checkpoint is missing or inconsistent."""


def atomic_write(path: Path, write) -> None:
    """``write(temp_path)`` beside ``path``, fsync, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(folder: Path, name: str, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint ``name`` (tensors + JSON ``state``); returns the JSON path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    json_path = folder / f"{name}.json"
    previous = _tensor_file(json_path) if json_path.is_file() else None
    tensor_name = f"{name}-{state['iteration']:09d}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(folder / tensor_name, lambda tmp: save_file(tensors, tmp))
    record = dict(state, tensors=tensor_name)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    if previous is not None and previous.name != tensor_name and previous.exists():
        previous.unlink()
    return json_path


def load(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of checkpoint ``name``, or None if there is none."""
    from safetensors.torch import load_file

    json_path = Path(folder) / f"{name}.json"
    if not json_path.is_file():
        return None
    try:
        state = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointStateError(f"{json_path}: not valid JSON: {exc}") from exc
    tensor_path = _tensor_file(json_path, state)
    if not tensor_path.is_file():
        raise CheckpointStateError(f"{json_path}: its tensor file {tensor_path.name} is missing")
    return load_file(str(tensor_path)), state


def _tensor_file(json_path: Path, state: dict | None = None) -> Path:
    state = json.loads(json_path.read_text()) if state is None else state
    if "tensors" not in state:
        raise CheckpointStateError(f"{json_path}: no 'tensors' entry")
    return json_path.parent / state["tensors"]


# ---------------------------------------------------------------- RNG states
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The torch (+ CUDA), numpy and Python RNG states: (tensors, JSON-able dict)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, state


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
