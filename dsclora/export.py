"""Export a SPAN to files other tools load: the official layout, spandrel's, ONNX.

- ``official``: the eval-form state dict of the released SPAN/DSCF files (44 keys for a
  6-block SPAN: ``*.eval_conv.{weight,bias}``, ``conv_cat.*``, ``upsampler.0.*``).
- ``spandrel``: the training-form layout spandrel's SPAN detector requires. spandrel
  re-collapses ``eval_conv`` from the branches on every forward, so each 3x3 kernel ``W``
  (and bias ``b``) is embedded exactly in the branches (``identity_branches``).
- ``onnx``: opset 17, dynamic batch/height/width, fp32 or fp16.

Checkpoints written as ``.safetensors`` carry metadata (``checkpoint_metadata``) that
``dsclora.load_model`` reads back (normalisation cannot be read off the shapes).
"""
import copy
import dataclasses
import importlib
import inspect
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .atomic import atomic_path
from .models import SPAN, Conv3XC
from .models.span import DEFAULT_RGB_MEAN
from .models.loading import SpanConfig

FORMATS = ("official", "spandrel", "onnx")
CHECKPOINT_SUFFIXES = (".pth", ".safetensors")
ONNX_OPSET = 17


def span_config(model: SPAN) -> SpanConfig:
    """The ``SpanConfig`` of a built model (form: "train" if any Conv3XC keeps its branches)."""
    form = "train" if any(getattr(m, "has_branches", False) for m in model.modules()) else "eval"
    return SpanConfig(
        model.feature_channels, model.cat_channels, model.upscale, model.in_channels,
        model.out_channels, form, float(model.img_range), tuple(model.mean.flatten().tolist()),
    )


def lora_config(model: nn.Module) -> dict[str, dict[str, float]]:
    """Rank and alpha of every ConvLoRA adapter in ``model`` (empty for a plain SPAN)."""
    return {
        name: {"rank": m.rank, "alpha": m.alpha}
        for name, m in model.named_modules() if hasattr(m, "lora_A")
    }


def checkpoint_metadata(config: SpanConfig, lora: dict | None = None, merged: bool = True) -> dict[str, str]:
    """String metadata describing a SPAN checkpoint (safetensors and ONNX metadata).

    ``lora``: the adapter config the weights were trained with, if any; ``merged``: whether
    those adapters are folded into the weights (every export is merged).
    """
    metadata = {
        "architecture": "SPAN",
        "feature_channels": str(config.feature_channels),
        "cat_channels": str(config.cat_channels),
        "upscale": str(config.upscale),
        "in_channels": str(config.in_channels),
        "out_channels": str(config.out_channels),
        "form": config.form,
        "img_range": repr(config.img_range),
        "rgb_mean": json.dumps(list(config.rgb_mean)),
        "merged": json.dumps(merged),
        "dsclora_version": __version__,
    }
    if lora:
        metadata["lora"] = json.dumps(lora, sort_keys=True)
    return metadata


def official_state_dict(model: SPAN) -> dict[str, torch.Tensor]:
    """The eval-form float32 CPU state dict of ``model`` in the released files' layout.

    Conv3XC branches are collapsed and unmerged ConvLoRA updates folded in (the weight a
    conv applies: its ``effective_weight()`` when it has one). ``model`` is not modified.
    """
    model = copy.deepcopy(model).eval()
    conv3xc = {name for name, m in model.named_modules() if isinstance(m, Conv3XC)}
    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in conv3xc:
                weight, bias = module.weight_and_bias()
                name = f"{name}.eval_conv"
            elif isinstance(module, nn.Conv2d) and not any(name.startswith(f"{c}.") for c in conv3xc):
                weight, bias = _applied_weight(module), module.bias
            else:
                continue
            state[f"{name}.weight"] = weight.detach().float().cpu().contiguous()
            state[f"{name}.bias"] = bias.detach().float().cpu().contiguous()
    return state


def _applied_weight(conv: nn.Conv2d) -> torch.Tensor:
    effective = getattr(conv, "effective_weight", None)
    return effective() if effective else conv.weight


def identity_branches(weight: torch.Tensor, bias: torch.Tensor, gain: int = 2) -> dict[str, torch.Tensor]:
    """Conv3XC training branches whose collapse is exactly ``(weight, bias)``.

    ``weight`` (c_out, c_in, 3, 3). conv.0 (1x1, c_in -> gain·c_in) copies the input into its
    first c_in channels with zero bias (so the zero padding applied before it stays zero);
    conv.1 (3x3) holds ``weight`` and ``bias`` in its first c_out x c_in block, zeros
    elsewhere; conv.2 (1x1) picks its first c_out channels; ``sk`` is zero. Every product in
    the collapse is a weight times 1 or 0, so the re-collapsed kernel equals ``weight``
    bit for bit. Keys are relative to the Conv3XC (``sk.weight``, ``conv.0.weight``, ...).
    """
    c_out, c_in = weight.shape[:2]
    conv0 = weight.new_zeros(gain * c_in, c_in, 1, 1)
    conv0[:c_in, :, 0, 0] = torch.eye(c_in, dtype=weight.dtype)
    conv1 = weight.new_zeros(gain * c_out, gain * c_in, 3, 3)
    conv1[:c_out, :c_in] = weight
    conv1_bias = bias.new_zeros(gain * c_out)
    conv1_bias[:c_out] = bias
    conv2 = weight.new_zeros(c_out, gain * c_out, 1, 1)
    conv2[:, :c_out, 0, 0] = torch.eye(c_out, dtype=weight.dtype)
    return {
        "sk.weight": weight.new_zeros(c_out, c_in, 1, 1), "sk.bias": bias.new_zeros(c_out),
        "conv.0.weight": conv0, "conv.0.bias": bias.new_zeros(gain * c_in),
        "conv.1.weight": conv1, "conv.1.bias": conv1_bias,
        "conv.2.weight": conv2, "conv.2.bias": bias.new_zeros(c_out),
        "eval_conv.weight": weight, "eval_conv.bias": bias,
    }


def spandrel_state_dict(model: SPAN) -> dict[str, torch.Tensor]:
    """The training-form state dict spandrel detects as SPAN, computing exactly ``model``.

    spandrel's SPAN fixes ``conv_cat`` to 4C -> C and the normalisation to SPAN's defaults
    (3 input channels, img_range 255, RGB mean); a model outside that raises ValueError.
    """
    config = span_config(model)
    default_mean = tuple(torch.tensor(DEFAULT_RGB_MEAN).tolist())  # float32-rounded, like config's
    unsupported = [
        f"{what} {ours} (spandrel: {theirs})"
        for what, ours, theirs in (
            ("in_channels", config.in_channels, 3),
            ("cat_channels", config.cat_channels, config.feature_channels),
            ("img_range", config.img_range, 255.0),
            ("rgb_mean", config.rgb_mean, default_mean),
        )
        if ours != theirs
    ]
    if unsupported:
        raise ValueError("spandrel's SPAN cannot represent this model: " + ", ".join(unsupported))
    official = official_state_dict(model)
    state = {}
    for key, value in official.items():
        conv3xc, is_conv3xc, leaf = key.partition(".eval_conv.")
        if not is_conv3xc:
            state[key] = value
        elif leaf == "weight":
            branches = identity_branches(value, official[f"{conv3xc}.eval_conv.bias"])
            state.update({f"{conv3xc}.{k}": v for k, v in branches.items()})
    return state


def deploy_model(model: SPAN) -> SPAN:
    """A float32 eval-form copy of ``model`` (branches collapsed, adapters folded in)."""
    plain = dataclasses.replace(span_config(model), form="eval").build()
    plain.load_state_dict(official_state_dict(model), strict=True)
    return plain.eval()


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``state`` atomically as ``.pth`` (torch.save) or ``.safetensors`` (with metadata)."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: checkpoint files end in {' or '.join(CHECKPOINT_SUFFIXES)}")
    with _replacing(path) as tmp:
        if path.suffix == ".safetensors":  # serialised here: save_file writes through a temporary of its own
            from safetensors.torch import save as serialise

            tmp.write_bytes(serialise({k: v.contiguous() for k, v in state.items()}, metadata=metadata))
        else:
            torch.save(state, tmp)
    return path


def export_onnx(model: SPAN, path: str | Path, dtype: torch.dtype = torch.float32,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as ONNX (opset 17): input ``input`` (N, C, H, W) -> ``output``
    (N, C, sH, sW), batch/height/width dynamic, weights and I/O in ``dtype`` (fp32 or fp16).

    Uses torch's TorchScript exporter (``dynamo=False``): it works on torch 2.4-2.13 without
    ``onnxscript``, which the newer torch.export-based exporter needs.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: ONNX files end in .onnx")
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"ONNX export supports float32 and float16, not {dtype}")
    onnx = _require("onnx", "ONNX export")
    plain = _ImageToImage(deploy_model(model).to(dtype))
    example = torch.rand(1, model.in_channels, 16, 16, dtype=dtype)
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    dynamic_in = {0: "batch", 2: "height", 3: "width"}
    dynamic_out = {0: "batch", 2: "out_height", 3: "out_width"}  # scale x height, scale x width
    with _replacing(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            plain, (example,), str(tmp), opset_version=ONNX_OPSET, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": dynamic_in, "output": dynamic_out}, **legacy,
        )
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def export(model: SPAN, fmt: str, out: str | Path, dtype: torch.dtype = torch.float32,
           lora: dict | None = None) -> Path:
    """Write ``model`` to ``out`` in format ``fmt`` (one of ``FORMATS``); returns the path.

    ``lora``: the adapter config to record in the metadata (default: ``model``'s adapters,
    if it has any). ``dtype`` applies to ONNX; checkpoints are float32 like the released ones.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    form = "train" if fmt == "spandrel" else "eval"
    config = dataclasses.replace(span_config(model), form=form)
    metadata = checkpoint_metadata(config, lora or lora_config(model) or None, merged=True)
    if fmt == "onnx":
        return export_onnx(model, out, dtype, metadata)
    state = spandrel_state_dict(model) if fmt == "spandrel" else official_state_dict(model)
    return save_checkpoint(state, out, metadata)


class _ImageToImage(nn.Module):
    """``model`` with a one-argument forward: the TorchScript exporter would otherwise turn
    SPAN's ``return_features=False`` default into a traced tensor input."""

    def __init__(self, model: SPAN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the {module!r} package: pip install 'dsclora[export]'"
        ) from exc


def _replacing(path: Path):
    """``atomic_path`` for an export target whose folder may not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_path(path)
