"""Crashes during training (tests/crash_harness.py): SIGKILL at every named moment of a step and a
checkpoint save (inside the tensor file's write included) leaves exactly the expected files, never a
corrupt checkpoint, and the resume continues from the last complete one to final weights equal to an
uninterrupted run's, bit for bit; seeded sequences of kills, a few at random times, explore further;
a full disk keeps the previous checkpoint; Ctrl+C (SIGINT) and SIGTERM save a checkpoint and exit
cleanly."""
import os
import re
import signal

import pytest

import crash_harness
from crash_harness import ITERATIONS, PAUSE_EVENTS, checkpoint_files, differing_outputs, matches_snapshot

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="training runs are forked processes")
TOTAL = sum(ITERATIONS)
#: Seed of the random kill sequence (DSCLORA_CRASH_SEED=<n> explores others; the test prints it).
SEED = int(os.environ.get("DSCLORA_CRASH_SEED", "2026"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The setup and an uninterrupted run, with a copy of every checkpoint it wrote."""
    root = tmp_path_factory.mktemp("crash")
    config = crash_harness.make_setup(root)
    snapshots = root / "snapshots"
    snapshots.mkdir()
    run = crash_harness.run(config, root / "reference", snapshot_dir=snapshots)
    assert run.code == 0, run.stderr
    assert sorted(int(p.stem) for p in snapshots.glob("*.json")) == list(range(1, TOTAL + 1))
    return config, snapshots, root / "reference", run.step_seconds()


@pytest.mark.parametrize("moment", list(PAUSE_EVENTS))
def test_sigkill_at_each_named_moment_leaves_exactly_the_expected_files(reference, tmp_path, moment):
    config, snapshots, reference_dir, _ = reference
    result = crash_harness.kill_at_moment(config, tmp_path / "run", snapshots, reference_dir, moment)
    found, expected = crash_harness.expected_after_kill(moment, result.k)
    assert result.killed, result
    assert crash_harness.files_match(result.after_kill, expected), result  # ours only, nothing foreign
    assert result.found == (found, True), result  # the last complete checkpoint, bit-identical
    assert result.resumed_at == found and result.final_code == 0, result
    assert result.after_resume == ["last-%09d.safetensors" % TOTAL, "last.json"], result  # leftovers gone
    assert result.differences == [], result
    assert result.ok


def test_expected_files_reject_a_foreign_temporary():
    """What the named-moment test compares with would catch a library's own ``.tmpXXXXXX``."""
    _, expected = crash_harness.expected_after_kill("inside the tensor file's write", 3)
    ours = sorted([".last-000000003.safetensors.ab12cd.tmp", "last-000000002.safetensors", "last.json"])
    assert crash_harness.files_match(ours, expected)
    assert not crash_harness.files_match(sorted(ours + [".tmpvIyBGf"]), expected)
    assert not crash_harness.files_match(sorted(["last-000000002.safetensors", "last.json", ".tmpvIyBGf"]), expected)


def test_sigkill_sequence_with_random_times_never_corrupts_and_resumes_exactly(reference, tmp_path):
    """Exploration beyond the named moments: two of the kills come at seeded random times."""
    config, snapshots, reference_dir, step_seconds = reference
    print(f"crash seed {SEED} (rerun with DSCLORA_CRASH_SEED={SEED})")
    kills, final = crash_harness.kill_and_resume(config, tmp_path / "run", snapshots, SEED, step_seconds)
    assert len(kills) == 6
    for kill in kills:
        assert kill.found in kill.allowed, (SEED, kill)  # the last complete checkpoint, not an older one
        assert kill.identical, (SEED, kill)  # never corrupt: equal to the uninterrupted run's
        assert kill.resumed_at == kill.found, (SEED, kill)  # the next run continued from it
        assert all(f.startswith(("last-", ".last-", ".last.json.")) for f in kill.leftovers), (SEED, kill)
    assert final.code == 0, final.stderr
    assert matches_snapshot(tmp_path / "run", snapshots) == (TOTAL, True)
    assert checkpoint_files(tmp_path / "run") == ["last-%09d.safetensors" % TOTAL, "last.json"], SEED
    assert differing_outputs(tmp_path / "run", reference_dir) == []


def test_leftovers_of_safetensors_own_writer_are_swept(tmp_path):
    """Older versions saved with safetensors.save_file, whose temporary (.tmp + 6 characters) a kill
    left behind; the next save removes those names, and only those, from the checkpoints folder."""
    import torch

    from dsclora.train import checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in (".tmpvIyBGf", ".tmpvIyBGfx", "notes.txt", ".tmp12"):
        (folder / name).write_bytes(b"x")
    checkpoint.save(folder, "last", {"w": torch.zeros(2)}, {"iteration": 1})
    assert sorted(p.name for p in folder.iterdir()) == [".tmp12", ".tmpvIyBGfx", "last-000000001.safetensors",
                                                        "last.json", "notes.txt"]


@pytest.mark.parametrize("file", ["last-000000003.safetensors for 3", "last.json for 3"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(reference, tmp_path, file):
    config, snapshots, reference_dir, _ = reference
    full = crash_harness.run(config, tmp_path / "run", disk_full_on=file)
    assert full.code == 1
    assert re.search(r"cannot save checkpoint 'last' of iteration 3 in .*: \[Errno 28\] No space left on device"
                     r".*; the previous 'last' checkpoint is intact", full.stderr), full.stderr
    assert "Traceback" not in full.stderr
    assert matches_snapshot(tmp_path / "run", snapshots) == (2, True)
    assert checkpoint_files(tmp_path / "run") == ["last-000000002.safetensors", "last.json"]  # nothing half-written
    resumed = crash_harness.run(config, tmp_path / "run", resume=True)
    assert resumed.code == 0 and crash_harness.first_step(resumed) == 2
    assert differing_outputs(tmp_path / "run", reference_dir) == []


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    config, snapshots, _, _ = reference
    run = crash_harness.run(config, tmp_path / "run", kill_after=("step 3", 0.0), signum=signal.SIGTERM)
    assert run.code == 130 and "Traceback" not in run.stderr
    stopped = int(re.search(rf"stopped at iteration (\d+) of {TOTAL}; checkpoint saved", run.stderr)[1])
    last_step = max(int(e.split()[1]) for e in run.events if e.startswith("step "))
    assert stopped == last_step + 1 >= 4  # the step under way when SIGTERM came finished, no other began
    assert matches_snapshot(tmp_path / "run", snapshots) == (stopped, True)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    """A real ``dsclora train`` process with a DataLoader worker gets SIGINT in its whole process
    group; checkpoints are otherwise only due at the end of stage 1 (iteration 8)."""
    config, snapshots, reference_dir, _ = reference
    code, err = crash_harness.ctrl_c(config, tmp_path / "run", 1, "checkpoint_every=100")
    assert code == 130, err
    assert "Traceback" not in err
    stopped = int(re.search(rf"stopped at iteration (\d+) of {TOTAL}; checkpoint saved in .*--resume", err)[1])
    assert 1 <= stopped < ITERATIONS[0]  # saved by the interrupt, not by the schedule
    assert matches_snapshot(tmp_path / "run", snapshots) == (stopped, True)
    resumed = crash_harness.run(config, tmp_path / "run", resume=True)
    assert resumed.code == 0 and crash_harness.first_step(resumed) == stopped
    assert differing_outputs(tmp_path / "run", reference_dir) == []
