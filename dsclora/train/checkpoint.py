"""Training checkpoints: tensors in safetensors, a small JSON state, both written atomically.

A checkpoint named ``last`` (or ``best``) is ``<name>.json`` pointing at a tensor file
``<name>-<iteration>.safetensors`` beside it. The tensor file is written (and fsync'ed) first,
then the JSON replaces the previous one in one ``os.replace``, and only then is the old tensor
file removed: a crash at any point leaves a complete, consistent checkpoint. What a crash leaves
besides (temporary files, a tensor file no JSON points to) is removed by the next ``save``.
Tensors are serialised in memory (``safetensors.torch.save``) and written through our own
temporary file: ``safetensors.torch.save_file`` would write through a temporary of its own
(``.tmpXXXXXX``), which a crash would leave behind under a name we do not own.
"""
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path


class CheckpointStateError(RuntimeError):
    """A training checkpoint is missing or inconsistent."""


def atomic_write(path: Path, write) -> None:
    """``write(temp_path)`` beside ``path``, fsync, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as tmp:
        write(str(tmp))


def save(folder: Path, name: str, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint ``name`` (tensors + JSON ``state``); returns the JSON path.

    If writing fails (OSError, e.g. a full disk), the previous checkpoint stays complete and
    nothing of the new one is left behind.
    """
    from safetensors.torch import save as serialise

    folder = Path(folder)
    json_path = folder / f"{name}.json"
    previous = _tensor_file(json_path) if json_path.is_file() else None
    remove_leftovers(folder, name, keep=previous)
    tensor_path = folder / f"{name}-{state['iteration']:09d}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = serialise(tensors)
    atomic_write(tensor_path, lambda tmp: Path(tmp).write_bytes(data))
    record = dict(state, tensors=tensor_path.name)
    try:
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    except BaseException:
        if tensor_path != previous:
            tensor_path.unlink(missing_ok=True)
        raise
    if previous is not None and previous != tensor_path and previous.exists():
        previous.unlink()
    return json_path


#: What ``safetensors.torch.save_file`` (dsclora <= 0.1.0 wrote checkpoints with it) leaves when killed:
#: the Rust tempfile crate's ``.tmp`` + 6 random characters. Only swept in the checkpoints folder.
_FOREIGN_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def remove_leftovers(folder: Path, name: str, keep: Path | None) -> list[Path]:
    """Delete what interrupted saves of checkpoint ``name`` left in ``folder``: temporary files
    (ours, and those of safetensors' own writer from older versions) and tensor files other than
    ``keep`` (the one its JSON points to). Returns the deleted paths."""
    stale = [p for p in Path(folder).glob(f".{name}[.-]*.tmp")]
    stale += [p for p in Path(folder).glob(".tmp*") if _FOREIGN_TEMPORARY.fullmatch(p.name) and p.is_file()]
    stale += [p for p in Path(folder).glob(f"{name}-*.safetensors") if p != keep]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of checkpoint ``name``, or None if there is none."""
    from safetensors.torch import load_file

    json_path = Path(folder) / f"{name}.json"
    if not json_path.is_file():
        return None
    try:
        state = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointStateError(f"{json_path}: not valid JSON: {exc}") from exc
    tensor_path = _tensor_file(json_path, state)
    if not tensor_path.is_file():
        raise CheckpointStateError(f"{json_path}: its tensor file {tensor_path.name} is missing")
    try:
        return load_file(str(tensor_path)), state
    except Exception as exc:  # safetensors' errors for truncated or corrupt files
        raise CheckpointStateError(f"{tensor_path}: cannot be read (truncated or corrupt?): {exc}") from exc


def check_tensor(tensors: dict[str, torch.Tensor], key: str, shape, source: Path) -> torch.Tensor:
    """``tensors[key]``, or a CheckpointStateError naming ``source`` and the key if it is missing,
    has another shape than ``shape`` or holds NaN/inf."""
    if key not in tensors:
        raise CheckpointStateError(f"{source}: tensor {key!r} is missing")
    value = tensors[key]
    if tuple(value.shape) != tuple(shape):
        raise CheckpointStateError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(shape)}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CheckpointStateError(f"{source}: tensor {key!r} holds NaN or inf")
    return value


def _tensor_file(json_path: Path, state: dict | None = None) -> Path:
    state = json.loads(json_path.read_text()) if state is None else state
    if not isinstance(state, dict) or not isinstance(state.get("tensors"), str):
        raise CheckpointStateError(f"{json_path}: no 'tensors' entry naming its tensor file")
    return json_path.parent / Path(state["tensors"]).name


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
