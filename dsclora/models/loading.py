"""Read SPAN checkpoints safely and build the matching model (``load_model``)."""
import dataclasses
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .span import SPAN

WRAPPER_KEYS = ("params_ema", "params", "state_dict")
#: SpanConfig fields that checkpoint metadata may declare and the shapes must confirm.
SHAPE_FIELDS = ("feature_channels", "cat_channels", "upscale", "in_channels", "out_channels")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not describe a SPAN model."""


@dataclass(frozen=True)
class SpanConfig:
    """Architecture hyper-parameters read off a state dict's shapes (and its metadata)."""

    feature_channels: int
    cat_channels: int
    upscale: int
    in_channels: int
    out_channels: int
    form: str  # "train" (Conv3XC branches present) or "eval"
    # Input normalisation: shapes cannot reveal it, only checkpoint metadata can.
    img_range: float = 255.0
    rgb_mean: tuple[float, ...] | None = None  # None: SPAN's default

    def build(self) -> SPAN:
        return SPAN(
            self.feature_channels, self.cat_channels, self.upscale,
            self.in_channels, self.out_channels, self.img_range, self.rgb_mean, form=self.form,
        )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a ``.pth``/``.pt``/``.safetensors`` file.

    ``.pth`` files are read with ``weights_only=True``: loading never executes code from them.
    Wrappers ``params_ema`` > ``params`` > ``state_dict`` are unwrapped, ``module.`` stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                obj = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle that wants to run code
        raise CheckpointError(f"{path}: {_unreadable(path, exc)}") from exc
    return unwrap_state_dict(obj, str(path)), metadata


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``path`` could not be read, in one line (instead of torch's advice to load it unsafely)."""
    found = re.search(r"GLOBAL [\w.]+", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and found:
        return (f"refused: it holds pickled Python objects, not only tensors ({found.group()}); loading it "
                "could run code. Re-save the state dict alone (torch.save(model.state_dict(), ...)) or as "
                ".safetensors")
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        return "empty file"
    if path.suffix != ".safetensors":
        if head == b"PK" and not zipfile.is_zipfile(path):
            return "truncated or corrupt torch.save archive (its zip directory is missing)"
        if head != b"PK" and head[0] != 0x80:  # torch.save writes a zip archive, or a pickle (legacy)
            return "not a torch.save file (neither a zip archive nor a pickle)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "weights_only" not in line and "torch.load" not in line), "")
    return f"cannot be read as a weights-only checkpoint: {type(exc).__name__}: {detail}"


def unwrap_state_dict(obj, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The flat tensor dict inside ``obj`` (see ``read_state_dict``)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def detect_config(state: dict[str, torch.Tensor], source: str = "state dict") -> SpanConfig:
    """Infer C, Cc, scale, channels and form of a SPAN state dict from its shapes."""
    form = "train" if "conv_1.sk.weight" in state else "eval"
    first = "conv_1.sk.weight" if form == "train" else "conv_1.eval_conv.weight"
    for key in (first, "conv_cat.weight", "upsampler.0.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: not a SPAN checkpoint, key {key!r} is missing")
    c, c_in = state[first].shape[:2]
    cc = state["conv_cat.weight"].shape[0]
    up_out = state["upsampler.0.weight"].shape[0]
    out_channels = c_in  # SR maps RGB->RGB (or gray->gray); the file cannot tell otherwise
    scale = math.isqrt(up_out // out_channels) if up_out % out_channels == 0 else 0
    if scale < 1 or scale * scale * out_channels != up_out:
        raise CheckpointError(
            f"{source}: 'upsampler.0.weight' has {up_out} output channels, "
            f"not {out_channels}*scale^2 for an integer scale"
        )
    return SpanConfig(int(c), int(cc), scale, int(c_in), out_channels, form)


def apply_metadata(config: SpanConfig, metadata: dict[str, str], source: str) -> SpanConfig:
    """``config`` checked against and completed by a checkpoint's metadata (written by
    ``dsclora.export``): shape-derived fields must agree, normalisation is taken from it.
    Files without ``architecture`` metadata (the released ``.pth`` files) pass unchanged.
    """
    if "architecture" not in metadata:
        return config
    if metadata["architecture"] != "SPAN":
        raise CheckpointError(f"{source}: metadata 'architecture' is {metadata['architecture']!r}, not 'SPAN'")
    try:
        declared = {f: int(metadata[f]) for f in SHAPE_FIELDS if f in metadata}
        img_range = float(metadata.get("img_range", config.img_range))
        rgb_mean = config.rgb_mean
        if "rgb_mean" in metadata:
            rgb_mean = tuple(float(v) for v in json.loads(metadata["rgb_mean"]))
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{source}: malformed metadata: {exc}") from exc
    for field, value in declared.items():
        if value != getattr(config, field):
            raise CheckpointError(
                f"{source}: metadata {field!r} = {value} but the weights' shapes give {getattr(config, field)}"
            )
    if rgb_mean is not None and len(rgb_mean) != config.in_channels:
        raise CheckpointError(
            f"{source}: metadata 'rgb_mean' has {len(rgb_mean)} values for {config.in_channels} input channels"
        )
    return dataclasses.replace(config, img_range=img_range, rgb_mean=rgb_mean)


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped key."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k]
    )
    problems = [
        f"{name}: {', '.join(items)}"
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("mis-shaped keys", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source}: does not match SPAN: " + "; ".join(problems))
    not_float = sorted(f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise CheckpointError(f"{source}: weights must be floating point: {', '.join(not_float)}")
    bad = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {', '.join(bad)}")


def load_model(weights, device: str | torch.device = "cpu") -> SPAN:
    """A SPAN in eval mode from a checkpoint path or a state dict (architecture auto-detected)."""
    metadata: dict[str, str] = {}
    if isinstance(weights, (str, Path)):
        source = str(weights)
        state, metadata = read_state_dict(weights)
    else:
        source = "state dict"
        state = unwrap_state_dict(weights, source)
    model = apply_metadata(detect_config(state, source), metadata, source).build()
    check_keys(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
