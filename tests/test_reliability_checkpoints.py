"""Hostile and broken checkpoints (tests/hostile_checkpoints.py): pickled code never runs, and
truncated files, other architectures, mis-shaped tensors and NaN weights give one clear error naming
the file and the key — through the API, ``dsclora infer --weights``, ``dsclora eval --weights``, the
trainer's model paths, and the trainer's own resume checkpoint (safetensors + JSON)."""
import contextlib
import io
import shutil

import numpy as np
import pytest
import torch

import crash_harness
import hostile_checkpoints
from corpus import cli_batch
from dsclora.cli import main as cli_main
from dsclora.data import save_image
from dsclora.infer import load as load_upscaler
from dsclora.models import CheckpointError, load_model, read_state_dict
from dsclora.train import Trainer, checkpoint, load_config
from dsclora.train.config import ConfigError
from dsclora.train.networks import load_span


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    marker = folder / "code_ran.txt"
    return folder, marker, hostile_checkpoints.build(folder / "files", marker)


def test_every_checkpoint_loads_or_fails_naming_file_reason_and_key(checkpoints):
    folder, marker, cases = checkpoints
    outcomes = [hostile_checkpoints.check(folder / "files", case) for case in cases]
    failed = [f"{o.name}: expected {o.expected}, got {o.got}" for o in outcomes if not o.passed]
    assert not failed, "\n".join(failed)
    assert sum(c.error is not None for c in cases) >= 15
    assert not marker.exists()


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The control: the same pickle, loaded the unsafe way, does create its marker file."""
    marker = tmp_path / "code_ran.txt"
    torch.save(hostile_checkpoints.Payload(marker), tmp_path / "payload.pth")
    torch.load(tmp_path / "payload.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["pickle_exec.pth", "pickle_exec_in_weights.pth"])
def test_pickled_code_is_refused_on_every_path_without_running(checkpoints, name, tmp_path):
    folder, marker, _ = checkpoints
    path = folder / "files" / name
    for load in (read_state_dict, load_model, load_upscaler):
        with pytest.raises(CheckpointError, match="refused.*GLOBAL exec"):
            load(path)
    with pytest.raises(ConfigError, match=f"model.base: {path}: refused"):
        load_span(str(path), "base")
    save_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
    run = cli_batch([str(tmp_path / "a.png")], tmp_path / "out", path)
    assert run.code == 2 and f"{path}: refused" in run.stderr and run.outputs == []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["eval", "--weights", str(path), "--hr-dir", str(tmp_path)])
    assert code == 1 and f"{path}: refused" in err.getvalue()
    assert not marker.exists()


@pytest.mark.parametrize("name,fragment", [("truncated.safetensors", "cannot be read"),
                                           ("misshaped.pth", "block_2.c1_r.eval_conv.weight"),
                                           ("nan_weight.pth", "block_4.c3_r.eval_conv.weight")])
def test_infer_weights_option_names_file_and_key(checkpoints, name, fragment, tmp_path):
    folder, _, _ = checkpoints
    save_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
    run = cli_batch([str(tmp_path / "a.png")], tmp_path / "out", folder / "files" / name)
    assert run.code == 2
    assert f"{folder / 'files' / name}: " in run.stderr and fragment in run.stderr
    assert "Traceback" not in run.stderr and run.outputs == []


# ---- the trainer's resume checkpoint (safetensors + JSON) ----------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-iteration run (tests/crash_harness.py's tiny setup) and its configuration."""
    root = tmp_path_factory.mktemp("resume")
    config_path = crash_harness.make_setup(root)
    overrides = [f"run_dir={root / 'run'}", "deterministic=false", "stages.0.iterations=1", "stages.1.iterations=1"]
    config = load_config(config_path, overrides)
    Trainer(config).run()
    return config_path, overrides, config, root / "run"


def resume_cases_of(run_dir):
    tensors, _ = checkpoint.load(run_dir / "checkpoints", "last")
    lora = next(k for k in tensors if k.startswith("lora."))
    slot = next(k for k in tensors if k.startswith("optim.") and tensors[k].dim() > 0)
    return hostile_checkpoints.resume_cases(lora, "ema." + lora.removeprefix("lora."), slot)


def test_a_damaged_resume_checkpoint_gives_one_clear_error_naming_file_and_key(trained_run, tmp_path):
    _, _, config, run_dir = trained_run
    cases = resume_cases_of(run_dir)
    outcomes = [hostile_checkpoints.check_resume(config, case, run_dir, tmp_path / f"case{i}")
                for i, case in enumerate(cases)]
    failed = [f"{o.name}: expected {o.expected}, got {o.got}" for o in outcomes if not o.passed]
    assert not failed, "\n".join(failed)
    assert not list(tmp_path.glob("*/checkpoints/ran.txt"))


def test_train_resume_command_reports_a_damaged_checkpoint(trained_run, tmp_path):
    config_path, overrides, _, run_dir = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    tensor_file = next((tmp_path / "run" / "checkpoints").glob("last-*.safetensors"))
    tensor_file.write_bytes(tensor_file.read_bytes()[:100])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["train", "--config", str(config_path), *overrides, f"run_dir={tmp_path / 'run'}", "--resume"])
    assert code == 2
    assert f"cannot resume: {tensor_file}: cannot be read" in err.getvalue() and "Traceback" not in err.getvalue()
