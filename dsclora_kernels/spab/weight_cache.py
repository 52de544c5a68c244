"""Packed SPAB weights, cached per (tensor, version): each backend packs once per weight update."""
import weakref
from typing import Callable

import torch
from torch import Tensor

_PACKED: dict = {}


def cached(tensors: tuple[Tensor, ...], kind: str, pack: Callable):
    """pack(*tensors), reused while every tensor is alive and unmodified (same ``_version``).
    Inference tensors have no version counter: they are packed on every call."""
    if any(t.is_inference() for t in tensors):
        return pack(*tensors)
    key = (kind, *(id(t) for t in tensors))
    versions = tuple(t._version for t in tensors)
    entry = _PACKED.get(key)
    if entry is not None and entry[1] == versions and all(r() is t for r, t in zip(entry[0], tensors)):
        return entry[2]
    with torch.no_grad():
        packed = pack(*tensors)
    drop = lambda _ref, key=key: _PACKED.pop(key, None)  # noqa: E731 -- forget dead weights
    _PACKED[key] = (tuple(weakref.ref(t, drop) for t in tensors), versions, packed)
    return packed
