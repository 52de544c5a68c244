"""Hostile and broken model checkpoints for the reliability tests and ``tests/reliability_report.py``.

``build(folder)`` writes each file and returns a ``CheckpointCase``: the fragment the error must
hold and the key it must name (or ``error`` None: the file loads). ``Payload`` pickles to a call
of ``exec`` that would create a marker file: a loader that executes pickled code leaves it behind.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from corpus import Outcome, reason_matches, tiny_span
from dsclora.models import SPAN


class Payload:
    """Unpickling this calls ``exec`` with code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from a checkpoint ran')",)


@dataclass
class CheckpointCase:
    name: str
    what: str
    error: str | None
    key: str | None = None  # a key of the state dict the message must name


def tiny_state(form: str = "eval") -> dict[str, torch.Tensor]:
    """A valid SPAN (C = 8, x2) state dict."""
    return tiny_span(form).state_dict()


def build(folder: Path, marker: Path) -> list[CheckpointCase]:
    """Write the checkpoints into ``folder``; ``marker`` is the file the payloads would create."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[CheckpointCase] = []

    def pth(name, what, obj, error, key=None):
        torch.save(obj, folder / name)
        cases.append(CheckpointCase(name, what, error, key))

    def raw(name, what, data: bytes, error):
        (folder / name).write_bytes(data)
        cases.append(CheckpointCase(name, what, error))

    def changed(**replace):
        state = tiny_state()
        state.update(replace)
        return state

    state = tiny_state()
    pth("valid.pth", "valid eval-form state dict", state, None)
    pth("valid_train_form.pth", "valid train-form state dict in a 'params_ema' wrapper",
        {"params_ema": tiny_state("train")}, None)
    pth("valid_fp16.pth", "float16 weights", {k: v.half() for k, v in state.items()}, None)
    save_file(state, str(folder / "valid.safetensors"))
    cases.append(CheckpointCase("valid.safetensors", "valid safetensors", None))

    pth("pickle_exec.pth", "pickle whose loading calls exec (would create a file)", Payload(marker),
        "refused")
    pth("pickle_exec_in_weights.pth", "a valid state dict with the payload under one key",
        changed(**{"conv_cat.bias": Payload(marker)}), "refused")
    pth("whole_module.pth", "a pickled nn.Module (torch.save(model))", SPAN(8, None, 2), "GLOBAL dsclora")
    good = (folder / "valid.pth").read_bytes()
    raw("truncated.pth", ".pth cut in half", good[:len(good) // 2], "truncated")
    good_st = (folder / "valid.safetensors").read_bytes()
    raw("truncated.safetensors", ".safetensors cut in half", good_st[:len(good_st) // 2], "cannot be read")
    raw("empty.pth", "zero-byte .pth", b"", "empty file")
    raw("text.pth", "text named .pth", b"not a checkpoint\n", "not a torch.save file")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}})
    raw("huge_header.safetensors", "safetensors header declaring a 4 TiB tensor in a tiny file",
        len(header).to_bytes(8, "little") + header.encode(), "cannot be read")
    pth("not_a_dict.pth", "a list of tensors", list(state.values()), "expected a dict of tensors")
    pth("resnet.pth", "another architecture (ResNet keys)",
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)},
        "not a SPAN checkpoint", "conv_1.eval_conv.weight")
    pth("non_tensor_value.pth", "a number where a tensor belongs", changed(**{"conv_cat.bias": 3}),
        "not a tensor", "conv_cat.bias")
    missing = tiny_state()
    del missing["block_3.c2_r.eval_conv.weight"]
    pth("missing_key.pth", "one tensor missing", missing, "missing keys", "block_3.c2_r.eval_conv.weight")
    pth("unexpected_key.pth", "one tensor too many", changed(**{"block_7.c1_r.eval_conv.bias": torch.zeros(8)}),
        "unexpected keys", "block_7.c1_r.eval_conv.bias")
    pth("misshaped.pth", "one tensor with the wrong shape",
        changed(**{"block_2.c1_r.eval_conv.weight": torch.zeros(8, 8, 5, 5)}),
        "mis-shaped", "block_2.c1_r.eval_conv.weight")
    pth("bad_scale.pth", "upsampler with 10 output channels (no integer scale)",
        changed(**{"upsampler.0.weight": torch.zeros(10, 8, 3, 3), "upsampler.0.bias": torch.zeros(10)}),
        "integer scale", "upsampler.0.weight")
    nan = tiny_state()
    nan["block_4.c3_r.eval_conv.weight"][0, 0, 1, 1] = float("nan")
    pth("nan_weight.pth", "one NaN weight", nan, "non-finite", "block_4.c3_r.eval_conv.weight")
    inf = tiny_state()
    inf["conv_cat.bias"][3] = float("inf")
    save_file(inf, str(folder / "inf_weight.safetensors"))
    cases.append(CheckpointCase("inf_weight.safetensors", "one inf bias (safetensors)", "non-finite",
                                "conv_cat.bias"))
    pth("int_weights.pth", "integer weights", changed(**{"conv_cat.weight": state["conv_cat.weight"].long()}),
        "floating point", "conv_cat.weight")
    for name, metadata, error in (
        ("other_architecture.safetensors", {"architecture": "ESRGAN"}, "'architecture' is 'ESRGAN'"),
        ("lying_metadata.safetensors", {"architecture": "SPAN", "feature_channels": "48"}, "'feature_channels' = 48"),
        ("malformed_metadata.safetensors", {"architecture": "SPAN", "rgb_mean": "[0.4, "}, "malformed metadata"),
    ):
        save_file(state, str(folder / name), metadata=metadata)
        cases.append(CheckpointCase(name, f"metadata {metadata}", error))
    (folder / "folder.pth").mkdir()
    cases.append(CheckpointCase("folder.pth", "a folder named .pth", "no such checkpoint file"))
    return cases


def check(folder: Path, case: CheckpointCase) -> Outcome:
    """Load ``case`` with ``load_model``: a SPAN, or one CheckpointError naming file, reason and key."""
    from dsclora.models import CheckpointError, load_model

    path = Path(folder) / case.name
    expected = "loads" if case.error is None else f"error: ...{case.error}..."
    expected += f" naming {case.key}" if case.key else ""
    try:
        model = load_model(path)
    except CheckpointError as exc:
        message = str(exc)
        reason = message.removeprefix(f"{path}: ")
        passed = (message.startswith(str(path)) and reason_matches(reason, case.error)
                  and (case.key is None or case.key in reason))
        return Outcome(case.name, case.what, expected, f"error: {_short(reason)}", passed)
    except Exception as exc:
        return Outcome(case.name, case.what, expected, f"UNCLEAR {type(exc).__name__}: {_short(str(exc))}", False)
    got = f"loads: SPAN C={model.feature_channels} x{model.upscale}"
    return Outcome(case.name, case.what, expected, got, case.error is None)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- the trainer's resume checkpoint
@dataclass
class ResumeCase:
    """A damage done to a copy of a run's ``checkpoints/`` folder, and the error resuming must give."""

    name: str
    damage: Callable[[Path], None]
    error: str
    key: str | None = None


def _edit_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / json.loads((folder / "last.json").read_text())["tensors"]
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_json(folder: Path, edit) -> None:
    state = json.loads((folder / "last.json").read_text())
    edit(state)
    (folder / "last.json").write_text(json.dumps(state))


def _tensor_path(folder: Path) -> Path:
    return folder / json.loads((folder / "last.json").read_text())["tensors"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def resume_cases(lora_key: str, ema_key: str, optim_key: str) -> list[ResumeCase]:
    """Damages of a resume checkpoint; ``*_key``: tensor names it holds (adapter, EMA, Adam slot)."""
    def set_nan(key):
        return lambda t: t[key].view(-1)[0].fill_(float("nan"))

    def reshape(key):
        return lambda t: t.update({key: t[key].flatten()[:-1].clone()})

    return [
        ResumeCase("truncated tensor file", lambda f: _truncate(_tensor_path(f)), "cannot be read"),
        ResumeCase("tensor file deleted", lambda f: _tensor_path(f).unlink(), "is missing"),
        ResumeCase("pickle in place of the tensor file",
                   lambda f: torch.save(Payload(f / "ran.txt"), _tensor_path(f)), "cannot be read"),
        ResumeCase("truncated JSON", lambda f: _truncate(f / "last.json"), "not valid JSON"),
        ResumeCase("JSON is a list", lambda f: (f / "last.json").write_text("[1, 2]"), "no 'tensors' entry"),
        ResumeCase("JSON points outside the folder",
                   lambda f: _edit_json(f, lambda s: s.update(tensors="../../../etc/hostname")), "is missing"),
        ResumeCase("JSON without param_groups", lambda f: _edit_json(f, lambda s: s.pop("param_groups")),
                   "are missing", "param_groups"),
        ResumeCase("iteration not a number", lambda f: _edit_json(f, lambda s: s.update(iteration="5")),
                   "is outside"),
        ResumeCase("adapter tensor missing", lambda f: _edit_tensors(f, lambda t: t.pop(lora_key)),
                   "do not match model.targets", lora_key.removeprefix("lora.")),
        ResumeCase("EMA tensor missing", lambda f: _edit_tensors(f, lambda t: t.pop(ema_key)), "is missing", ema_key),
        ResumeCase("RNG state missing", lambda f: _edit_tensors(f, lambda t: t.pop("rng.torch")), "is missing",
                   "rng.torch"),
        ResumeCase("mis-shaped adapter", lambda f: _edit_tensors(f, reshape(lora_key)), "has shape", lora_key),
        ResumeCase("mis-shaped Adam slot", lambda f: _edit_tensors(f, reshape(optim_key)), "has shape", optim_key),
        ResumeCase("NaN in the EMA", lambda f: _edit_tensors(f, set_nan(ema_key)), "NaN", ema_key),
        ResumeCase("NaN in an adapter", lambda f: _edit_tensors(f, set_nan(lora_key)), "NaN", lora_key),
    ]


def check_resume(config, case: ResumeCase, pristine: Path, run_dir: Path) -> Outcome:
    """Copy the run folder ``pristine``, damage its checkpoint, resume: one clear error naming the
    file (and the key) must come, from ``Trainer(config, resume=True)``."""
    import dataclasses
    import shutil

    from dsclora.train import ConfigError, Trainer
    from dsclora.train.checkpoint import CheckpointStateError

    shutil.copytree(pristine, run_dir)
    case.damage(run_dir / "checkpoints")
    expected = f"error: ...{case.error}..." + (f" naming {case.key}" if case.key else "")
    try:
        Trainer(dataclasses.replace(config, run_dir=str(run_dir)), resume=True)
    except (CheckpointStateError, ConfigError) as exc:
        message = str(exc)
        passed = (str(run_dir / "checkpoints") in message and reason_matches(message, case.error)
                  and (case.key is None or case.key in message))
        return Outcome(case.name, case.name, expected, f"{type(exc).__name__}: {_short(message, 240)}", passed)
    except Exception as exc:
        return Outcome(case.name, case.name, expected, f"UNCLEAR {type(exc).__name__}: {_short(str(exc))}", False)
    return Outcome(case.name, case.name, expected, "resumed without an error", False)
