"""Hostile and broken checkpoints (tests/hostile_checkpoints.py): pickled code never runs, and
truncated files, other architectures, mis-shaped tensors and NaN weights give one clear error naming
the file and the key — through the API, ``dsclora infer --weights``, ``dsclora eval --weights``, the
trainer's model paths, and the trainer's own resume checkpoint (safetensors + JSON)."""
import contextlib
import io

import numpy as np
import pytest
import torch

import hostile_checkpoints
from corpus import cli_batch
from dsclora.cli import main as cli_main
from dsclora.data import save_image
from dsclora.infer import load as load_upscaler
from dsclora.models import CheckpointError, load_model, read_state_dict
from dsclora.train.config import ConfigError
from dsclora.train.trainer import load_span


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
