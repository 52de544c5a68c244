"""The DSCLoRA trainer: configuration, data, checkpoints, exact resume after SIGKILL, DDP, export."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsclora.data import imresize, load_image, save_image
from dsclora.evaluation import evaluate_folder
from dsclora.models import SPAN, load_model
from dsclora.sample_data import write_sample_images
from dsclora.train import ConfigError, Trainer, TrainingError, load_config, to_toml
from dsclora.train import checkpoint
from dsclora.train.data import IterationSampler, PatchDataset, find_images

# Subprocesses run outside the source tree so that `-m dsclora` imports the installed package
# (with its compiled kernels), not the uncompiled sources.
OUTSIDE_SOURCE = tempfile.gettempdir()


def toml_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def tiny(tmp_path):
    """Sample images and two tiny x2 SPAN checkpoints (base C=8, wider teacher C=10)."""
    write_sample_images(tmp_path / "train", 5, seed=0, height=40, width=48)
    save_image(tmp_path / "train" / "zz_small.png", np.zeros((12, 12, 3), np.float32))
    write_sample_images(tmp_path / "val", 2, seed=50, height=24, width=28)
    torch.manual_seed(1)
    torch.save(SPAN(8, upscale=2, form="eval").state_dict(), tmp_path / "base.pth")
    torch.save(SPAN(10, upscale=2, form="train").state_dict(), tmp_path / "teacher.pth")
    return tmp_path


def tiny_config(root: Path, run: str = "run", **extra) -> Path:
    text = f"""
run_dir = "{root / run}"
progress = false
log_every = 2
checkpoint_every = 2
[model]
base = "{root / 'base.pth'}"
teacher = "{root / 'teacher.pth'}"
ranks = {{ block_1 = 2, block_2 = 2, block_3 = 2, block_4 = 2, block_5 = 2, block_6 = 2, conv_2 = 3, "upsampler.0" = 2 }}
[data]
hr = ["{root / 'train'}"]
workers = 0
[[stages]]
iterations = 3
patch_size = 16
batch_size = 2
lr = 1e-3
[[stages]]
iterations = 2
patch_size = 24
batch_size = 2
lr = 1e-3
"""
    path = toml_file(root / f"{run}.toml", text)
    return path


# ---------------------------------------------------------------- configuration
def test_defaults_follow_the_spec(tmp_path):
    path = toml_file(tmp_path / "c.toml", '[model]\nbase = "b.pth"\nteacher = "t.pth"\n[data]\nhr = ["x"]\n')
    config = load_config(path)
    assert [(s.patch_size, s.iterations, s.batch_size, s.lr) for s in config.stages] == [
        (256, 50_000, 8, 1e-4), (512, 50_000, 8, 1e-4)]
    assert (config.loss.rec, config.loss.ts, config.loss.ad) == (1.0, 0.1, 0.01)
    assert config.optim.ema_decay == 0.999 and config.data.augment and config.model.beta == 1.0
    assert config.model.ranks["conv_2"] == 24 and len(config.model.targets) == 20


def test_overrides_and_the_saved_toml_round_trip(tmp_path):
    path = toml_file(tmp_path / "c.toml", '[model]\nbase = "b.pth"\nteacher = "t.pth"\n[data]\nhr = ["x"]\n')
    config = load_config(path, ["stages.0.iterations=7", "stages[1].patch_size=64", "loss.ad=0.5",
                                "model.ranks.block_1=3", 'data.hr=["a", "b"]', "run_dir=my run",
                                "stages.2.iterations=4"])
    assert config.stages[0].iterations == 7 and config.stages[1].patch_size == 64
    assert len(config.stages) == 3 and config.stages[2].patch_size == 256  # appended with defaults
    assert config.loss.ad == 0.5 and config.model.ranks["block_1"] == 3
    assert config.data.hr == ["a", "b"] and config.run_dir == "my run"
    saved = toml_file(tmp_path / "saved.toml", to_toml(config))
    assert load_config(saved) == config


def test_yaml_configuration(tmp_path):
    pytest.importorskip("yaml")
    path = toml_file(tmp_path / "c.yaml", "model: {base: b.pth, teacher: t.pth}\ndata: {hr: [x]}\n"
                                          "stages: [{iterations: 5, patch_size: 32}]\n")
    config = load_config(path)
    assert config.stages[0].iterations == 5 and config.stages[0].batch_size == 8


@pytest.mark.parametrize("text,override,key", [
    ('[data]\nhr_dirs = ["x"]', None, "data.hr_dirs"),
    ('[[stages]]\niterations = "ten"', None, "stages[0].iterations"),
    ("", "stages.0.patch_size=-4", "stages[0].patch_size"),
    ("", "amp=fp8", "amp"),
    ("", "loss.reconstruction=huber", "loss.reconstruction"),
    ("", "loss.features=all", "loss.features"),
    ("", "stages.0.schedule=linear", r"stages[0].schedule"),
    ("", "model.teacher=", "model.teacher"),
    ("", "data.lr=['a', 'b']", "data.lr"),
    ("", "nonsense", "KEY=VALUE"),
])
def test_errors_name_the_key(tmp_path, text, override, key):
    base = '[model]\nbase = "b.pth"\nteacher = "t.pth"\n[data]\nhr = ["x"]\n'
    path = toml_file(tmp_path / "c.toml", base + text if "[data]" not in text else
                     '[model]\nbase = "b.pth"\nteacher = "t.pth"\n' + text)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, [override] if override else [])


def test_bad_paths_and_layers_are_config_errors_naming_the_key(tiny):
    for override, key in ((f"data.hr=['{tiny / 'nowhere'}']", "data: .*nowhere"),
                          (f"validation.hr=['{tiny / 'nope'}']", "validation.hr: .*nope"),
                          (f"model.base={tiny / 'missing.pth'}", "model.base: .*missing.pth"),
                          ("model.targets=['block_1.c1_r.eval_conv', 'block_7.c1_r.eval_conv']",
                           "model.ranks / model.targets: .*block_7")):
        with pytest.raises(ConfigError, match=key):
            Trainer(load_config(tiny_config(tiny), [override]))


def test_missing_required_keys_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model.base"):
        load_config(toml_file(tmp_path / "c.toml", '[data]\nhr = ["x"]\n'))
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(toml_file(tmp_path / "bad.toml", "a = [1,"))


# ---------------------------------------------------------------- data
def test_samples_are_a_pure_function_of_seed_and_index(tiny, caplog):
    entries = find_images([str(tiny / "train")], [], 2)
    with caplog.at_level("WARNING", logger="dsclora"):
        a = PatchDataset(entries, 2, 16, seed=3)
    assert "zz_small.png" in caplog.text and len(a) == 5  # smaller than the patch: skipped
    b = PatchDataset(entries, 2, 16, seed=3)
    c = PatchDataset(entries, 2, 16, seed=4)
    for index in (0, 7, 123):
        lr_a, hr_a = a[index]
        lr_b, hr_b = b[index]
        assert lr_a.shape == (3, 8, 8) and hr_a.shape == (3, 16, 16)
        assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)
    assert not torch.equal(a[5][1], c[5][1])
    # every image once per epoch
    assert sorted(a.plan(i)[0] for i in range(5)) == list(range(5))


def test_on_the_fly_lr_is_the_crop_of_the_whole_images_bicubic_lr(tmp_path):
    write_sample_images(tmp_path / "hr", 3, seed=5, height=50, width=43)  # not multiples of the scale
    dataset = PatchDataset(find_images([str(tmp_path / "hr")], [], 4), 4, 24, seed=0, augment=False)
    mismatches = 0
    for index in range(12):
        lr, hr = dataset[index]
        image, top, left, _ = dataset.plan(index)
        full = load_image(dataset.entries[image].hr).rgb
        assert np.array_equal(hr.permute(1, 2, 0).numpy(), full[top:top + 24, left:left + 24])
        whole = np.round(np.clip(imresize(full[:48, :40], 0.25), 0, 1) * 255) / 255  # mod-cropped
        expected = whole[top // 4:top // 4 + 6, left // 4:left // 4 + 6]
        diff = np.abs(lr.permute(1, 2, 0).numpy() - expected)
        assert diff.max() <= 1 / 255 + 1e-6  # float32 vs float64 rounding can flip a level
        mismatches += int((diff > 1e-6).sum())
    assert mismatches <= 12 * 6 * 6 * 3 // 100
    # without context the border of the LR patch would differ (what the margin is for)
    lr_alone = imresize(hr.permute(1, 2, 0).numpy(), 0.25)
    assert np.abs(lr_alone - expected).max() > 2 / 255


def test_paired_lr_crops_are_aligned(tmp_path):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    for path in write_sample_images(hr_dir, 3, seed=9, height=36, width=30):
        hr = load_image(path).rgb
        lr = hr.reshape(12, 3, 10, 3, 3).mean(axis=(1, 3))  # 3x3 box average: alignment is checkable
        save_image(lr_dir / f"{path.stem}x3.png", lr)
    dataset = PatchDataset(find_images([str(hr_dir)], [str(lr_dir)], 3), 3, 12, seed=0)
    for index in range(6):
        lr, hr = dataset[index]
        box = hr.reshape(3, 4, 3, 4, 3).mean(dim=(2, 4))
        assert (lr - box).abs().max() <= 0.5 / 255 + 1e-6


def test_paired_lr_sizes_are_checked(tmp_path):
    write_sample_images(tmp_path / "hr", 1, height=20, width=20)
    save_image(tmp_path / "lr" / "sample_00000.png", np.zeros((7, 10, 3), np.float32))
    with pytest.raises(ValueError, match="sample_00000.png"):
        find_images([str(tmp_path / "hr")], [str(tmp_path / "lr")], 2)


def test_sampler_shards_the_global_batch_and_workers_do_not_change_data(tiny):
    single = list(IterationSampler(3, 6, 4))
    shards = [list(IterationSampler(3, 6, 4, rank, 2)) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == single == list(range(12, 24))
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="divisible"):
        IterationSampler(0, 1, 3, 0, 2)
    dataset = PatchDataset(find_images([str(tiny / "train")], [], 2), 2, 16, seed=0)
    loaders = [torch.utils.data.DataLoader(dataset, batch_size=2, sampler=IterationSampler(1, 4, 2),
                                           num_workers=w) for w in (0, 2)]
    for (lr0, hr0), (lr2, hr2) in zip(*loaders):
        assert torch.equal(lr0, lr2) and torch.equal(hr0, hr2)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_files_are_replaced_atomically(tmp_path):
    checkpoint.save(tmp_path, "last", {"w": torch.ones(3)}, {"iteration": 2})
    (tmp_path / ".last.json.crashed.tmp").write_text("{")  # a write that died half-way
    checkpoint.save(tmp_path, "last", {"w": torch.full((3,), 5.0)}, {"iteration": 4})
    tensors, state = checkpoint.load(tmp_path, "last")
    assert state["iteration"] == 4 and torch.equal(tensors["w"], torch.full((3,), 5.0))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["last-000000004.safetensors"]
    assert checkpoint.load(tmp_path, "best") is None
    (tmp_path / "last-000000004.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointStateError, match="missing"):
        checkpoint.load(tmp_path, "last")


def test_rng_states_round_trip_through_json():
    tensors, state = checkpoint.rng_state()
    state = json.loads(json.dumps(state))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(2), random.random()
    checkpoint.set_rng_state(tensors, state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


# ---------------------------------------------------------------- the trainer, in process
def test_training_run_folder_export_and_validation(tiny):
    config = load_config(tiny_config(tiny), [f'validation.hr=["{tiny / "val"}"]', "validation.every=2"])
    result = Trainer(config).run()
    run = tiny / "run"
    assert result.iterations == 5 and result.skipped_steps == 0
    assert load_config(run / "config.toml") == config
    rows = list(csv.DictReader(open(run / "train_log.csv")))
    assert [int(r["iteration"]) for r in rows] == [2, 3, 4, 5]  # every 2 and at the end of stage 1
    assert all(float(r[f"grad_{term}"]) > 0 for r in rows for term in ("rec", "ts", "ad"))
    validation = list(csv.DictReader(open(run / "validation.csv")))
    assert [int(r["iteration"]) for r in validation] == [0, 2, 3, 4, 5]  # 0: the base model
    assert Image.open(run / "loss_curve.png").format == "PNG"
    table = (run / "results.md").read_text()
    assert all(name in table for name in ("bicubic", "base", "dsclora", "teacher", "val"))
    # the exports are plain SPANs in the official layout: dsclora_x2 the best validated model
    # (first maximum of the mean PSNR, the base at iteration 0 included), _last the final EMA
    psnrs = [float(r["psnr"]) for r in validation]
    best_iteration = int(validation[psnrs.index(max(psnrs))]["iteration"])
    assert json.loads((run / "checkpoints" / "best.json").read_text())["iteration"] == best_iteration
    assert f"dsclora (best: it {best_iteration})" in table
    state = torch.load(run / "dsclora_x2_last.pth", weights_only=True)
    assert set(state) == set(SPAN(8, upscale=2, form="eval").state_dict())
    last = SPAN(8, upscale=2, form="eval")
    last.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 9, 7)
    trainer = Trainer(config, resume=True)
    best_tensors, _ = checkpoint.load(run / "checkpoints", "best")
    with torch.no_grad():
        assert torch.allclose(last(x), load_model(run / "dsclora_x2_last.safetensors")(x), atol=1e-6)
        assert torch.allclose(last(x), trainer.selection.deployed_model()(x), atol=1e-5)  # EMA of the last checkpoint
        assert not torch.allclose(last(x), load_model(tiny / "base.pth")(x), atol=1e-4)  # it trained
        best = trainer.selection.deployed_model({n: best_tensors[f"ema.{n}"] for n in trainer.params})
        assert torch.allclose(load_model(run / "dsclora_x2.pth")(x), best(x), atol=1e-5)


def test_the_export_is_the_base_when_no_fine_tuned_model_validates_better(tiny, caplog):
    # a learning rate that wrecks the adapters: every validation after iteration 0 is worse
    config = load_config(tiny_config(tiny), [f'validation.hr=["{tiny / "val"}"]', "validation.every=1",
                                             "stages.0.lr=5.0", "stages.1.lr=5.0", "loss.ad=0"])
    with caplog.at_level("WARNING", logger="dsclora"):
        Trainer(config).run()
    run = tiny / "run"
    validation = list(csv.DictReader(open(run / "validation.csv")))
    assert max(float(r["psnr"]) for r in validation[1:]) < float(validation[0]["psnr"])
    assert "no validated checkpoint beat the base model" in caplog.text
    exported = torch.load(run / "dsclora_x2.pth", weights_only=True)
    base = torch.load(tiny / "base.pth", weights_only=True)
    assert exported.keys() == base.keys() and all(torch.equal(exported[k], base[k]) for k in base)


def test_cosine_schedule_and_dscf_features(tiny):
    config = load_config(tiny_config(tiny), ['stages.0.schedule="cosine"', 'loss.features="dscf"',
                                             "log_every=1"])
    assert [config.stages[0].lr_at(i) for i in range(3)] == pytest.approx([1e-3, 0.75e-3, 0.25e-3])
    assert config.stages[1].lr_at(1) == 1e-3
    Trainer(config).run()
    rows = list(csv.DictReader(open(tiny / "run" / "train_log.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 0.75e-3, 0.25e-3, 1e-3, 1e-3])
    assert all(float(r["ad"]) > 0 for r in rows)


def test_existing_run_needs_resume(tiny):
    config = load_config(tiny_config(tiny), ["stages.1.iterations=1", "stages.0.iterations=2"])
    Trainer(config).run()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(config)


def test_non_finite_steps_are_skipped_then_the_run_aborts(tiny):
    config = load_config(tiny_config(tiny), ["max_nonfinite=3"])
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    lr, hr = torch.rand(2, 3, 8, 8), torch.full((2, 3, 16, 16), float("nan"))
    assert trainer.step(lr, hr) is None and trainer.progress.skipped == 1
    assert all(torch.equal(before[n], p) for n, p in trainer.params.items())
    assert trainer.step(lr, torch.rand(2, 3, 16, 16)) is not None and trainer.progress.nonfinite_run == 0
    trainer.step(lr, hr)
    trainer.step(lr, hr)
    with pytest.raises(TrainingError, match="3 consecutive"):
        trainer.step(lr, hr)


def test_bf16_autocast_runs(tiny):
    config = load_config(tiny_config(tiny), ["amp=bf16", "stages.0.iterations=1", "stages.1.iterations=1"])
    result = Trainer(config).run()
    assert result.iterations == 2 and result.skipped_steps == 0


# ---------------------------------------------------------------- subprocesses: SIGKILL + resume, DDP
def run_cli(args, env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dsclora", *args], cwd=OUTSIDE_SOURCE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load(run_dir / "checkpoints", "last")
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def test_sigkilled_run_resumes_exactly_and_exports_spantiny(shared, tmp_path):
    """The acceptance run: 20 iterations of SPAN-Tiny + teacher SPAN ch28 on train_Sun80; a copy
    killed with SIGKILL mid-run and resumed ends with the same weights as an uninterrupted run."""
    text = f"""
progress = false
deterministic = true
checkpoint_every = 2
log_every = 5
[model]
base = "{shared / 'weights' / 'spantiny_ch26_x4_ntire24.pth'}"
teacher = "{shared / 'weights' / 'span_ch28_x4_ntire24.pth'}"
[data]
hr = ["{shared / 'data' / 'train_Sun80'}"]
workers = 1
[[stages]]
iterations = 12
patch_size = 48
batch_size = 2
[[stages]]
iterations = 8
patch_size = 64
batch_size = 2
"""
    config = toml_file(tmp_path / "sun80.toml", text)
    full = run_cli(["train", "--config", str(config), f"run_dir={tmp_path / 'full'}"])
    killed = run_cli(["train", "--config", str(config), f"run_dir={tmp_path / 'killed'}"])
    last = tmp_path / "killed" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        if last.is_file() and json.loads(last.read_text())["iteration"] >= 6:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert killed.wait() == -signal.SIGKILL, killed.stdout.read()
    interrupted_at = json.loads(last.read_text())["iteration"]
    assert 6 <= interrupted_at < 20
    resumed = run_cli(["train", "--config", str(config), f"run_dir={tmp_path / 'killed'}", "--resume"])
    out_resumed, out_full = resumed.communicate(timeout=300)[0], full.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out_resumed
    assert full.returncode == 0, out_full
    assert "resumed from" in out_resumed and f"iteration {interrupted_at}" in out_resumed
    a, b = final_tensors(tmp_path / "full"), final_tensors(tmp_path / "killed")
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    exported = tmp_path / "killed" / "dsclora_x4.pth"
    state = torch.load(exported, weights_only=True)
    assert len(state) == 44
    SPAN(26, form="eval").load_state_dict(state, strict=True)
    for key, value in torch.load(tmp_path / "full" / "dsclora_x4.pth", weights_only=True).items():
        assert torch.equal(value, state[key]), key
    scores = evaluate_folder(load_model(exported), shared / "data" / "Set5", scale=4)
    assert scores["n"] == 5 and abs(scores["psnr"] - 31.737) < 0.5  # near SPAN-Tiny after 20 steps


def test_two_process_gloo_run_matches_one_process(tiny):
    config = tiny_config(tiny)
    common = ["deterministic=true", "stages.0.batch_size=4", "stages.1.batch_size=4", "stages.1.iterations=1"]
    single = run_cli(["train", "--config", str(config), f"run_dir={tiny / 'one'}", *common])
    out_single = single.communicate(timeout=300)[0]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000), "-m", "dsclora", "train",
                "--config", str(config), f"run_dir={tiny / 'two'}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(torchrun, cwd=OUTSIDE_SOURCE, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, out_single
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = final_tensors(tiny / "one"), final_tensors(tiny / "two")
    assert json.loads((tiny / "two" / "checkpoints" / "last.json").read_text())["world_size"] == 2
    for key in a:
        if key.startswith(("lora.", "ema.")):
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    changed = [k for k in a if k.startswith("lora.") and "lora_B" in k and a[k].abs().max() > 0]
    assert changed  # the adapters did train
