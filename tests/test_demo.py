"""``dsclora demo``: the full default run (as in CI) and its building blocks."""
import os
import re
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from dsclora import infer
from dsclora.demo import (
    REAL_RECIPE, TOY_RECIPE, DemoSettings, affinity_memory, benchmark_table, bicubic_taps, finetune_config,
    fit_linear_upsampler, interpolation_init, with_img_range,
)
from dsclora.evaluation import ImagePair
from dsclora.models import SPAN, load_model
from dsclora.sample_data import sample_image



def test_sample_images_are_deterministic_and_varied():
    a, b = sample_image(7, 40, 56), sample_image(7, 40, 56)
    assert a.shape == (40, 56, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, sample_image(8, 40, 56))
    assert a.std() > 10  # not a flat image


def test_interpolation_start_and_img_range_conversion_are_exact():
    taps = bicubic_taps(4)
    assert np.allclose(taps.sum(axis=1), 1) and np.allclose(taps, taps[::-1, ::-1])
    model = SPAN(8, upscale=4, img_range=1.0, form="eval").double()
    interpolation_init(model)
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)[0].numpy()
    # the start is the separable 3-tap filter applied to the zero-padded (x − mean), plus the mean
    mean = model.mean.flatten().numpy()
    padded = np.pad(x[0].numpy() - mean[:, None, None], ((0, 0), (1, 1), (1, 1)))
    expected = np.empty((3, 24, 28))
    for i in range(6):
        for j in range(7):
            for a in range(4):
                for b in range(4):
                    window = padded[:, i:i + 3, j:j + 3]
                    expected[:, 4 * i + a, 4 * j + b] = np.einsum("y,x,cyx->c", taps[a], taps[b], window) + mean
    assert np.abs(y - expected).max() < 1e-12
    with torch.no_grad():
        standard = with_img_range(model.float()).double()
        assert standard.img_range == 255 and np.abs(standard(x)[0].numpy() - y).max() < 1e-5


def test_least_squares_recovers_a_linear_upsampler():
    truth = np.random.default_rng(0).normal(size=(4, 3, 3))  # x2: 4 sub-pixel kernels
    model = SPAN(6, upscale=2, form="eval").double()
    interpolation_init(model, truth)
    mean = model.mean.flatten().numpy()
    pairs = []
    for seed in range(3):
        lr = np.random.default_rng(seed).uniform(0, 1, (10, 12, 3))
        with torch.no_grad():
            hr = model(torch.from_numpy(lr).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        pairs.append(ImagePair(f"{seed}", hr * 255, lr * 255))
    assert np.allclose(fit_linear_upsampler(pairs, 2, mean), truth, atol=1e-8)


def test_affinity_memory_numbers():
    naive, fused = affinity_memory(batch=2, lr_patch=48, channels=(12, 24))
    n = 48 * 48
    assert naive == 6 * 2 * 2 * n * n * 4 and fused == 6 * 2 * 2 * 36 * n * 4


def test_real_checkpoints_get_the_studied_recipe_validated_on_held_out_images(tmp_path):
    toy = finetune_config(DemoSettings(out=tmp_path), tmp_path / "b.pth", tmp_path / "t.pth", tmp_path / "tr",
                          tmp_path / "held")
    real = finetune_config(DemoSettings(out=tmp_path, base="b.pth", teacher="t.pth"), tmp_path / "b.pth",
                           tmp_path / "t.pth", tmp_path / "tr", tmp_path / "held")
    assert [s.iterations for s in toy.stages] == [s[0] for s in TOY_RECIPE.stages]
    assert [(s.iterations, s.patch_size, s.batch_size, s.lr) for s in real.stages] == [
        s[:4] for s in REAL_RECIPE.stages]
    assert (real.loss.rec, real.loss.ts, real.loss.ad, real.model.beta) == (0.0, 1.0, 0.001, 0.5)
    assert real.validation.hr == toy.validation.hr == [str(tmp_path / "held")]


def test_benchmark_table_has_every_set_and_the_change_against_the_base():
    results = {m: {s: {"psnr": p + i, "ssim": 0.5, "seconds": 1.0}
                   for i, s in enumerate(("held-out", "Set5", "Set14"))}
               for m, p in (("base", 30.0), ("DSCLoRA", 30.0125))}
    table = benchmark_table(results)
    assert "Set5" in table and "Set14" in table and "held-out" not in table
    assert table.strip().endswith("| DSCLoRA − base (dB) | +0.0125 | +0.0125 |")


def _table_value(text: str, model: str) -> float:
    match = re.search(rf"^\| {model} \| [^|]+ \| ([0-9.]+) \|", text, re.MULTILINE)
    assert match, f"no row for {model} in\n{text}"
    return float(match.group(1))


def test_default_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # One thread: on a shared 2-core runner two busy OpenMP threads can be several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "dsclora", "demo", "--out", str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout
    assert "demonstration numbers" in text and "naive" in text and "fused" in text
    psnr = {m: _table_value(text, m) for m in ("bicubic", "base", "teacher", "DSCLoRA")}
    assert psnr["base"] > psnr["bicubic"]  # the pretraining did learn something
    assert abs(psnr["DSCLoRA"] - psnr["base"]) < 0.5  # merged adapters: a sane model of the same size
    exported = out / "run" / "dsclora_x4.pth"
    state = torch.load(exported, weights_only=True)
    SPAN(12, upscale=4, form="eval").load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.allclose(infer.load(exported, device="cpu")(x), load_model(exported)(x), atol=1e-4)
    assert len(list((out / "comparisons").glob("*.png"))) == 8
    assert len(list((out / "outputs").glob("*.png"))) == 8
    for png in (out / "run" / "loss_curve.png", out / "pretrain_loss.png"):
        assert Image.open(png).format == "PNG"
    assert "DSCLoRA" in (out / "README.md").read_text()


def test_the_ms_column_times_the_model_calls_only(monkeypatch):
    """TimedModel adds up the time inside the model's calls (a fake clock ticking once per reading:
    each call is exactly one tick), none of the work between them."""
    from dsclora import demo

    ticks = iter(range(100))
    monkeypatch.setattr(demo.time, "perf_counter", lambda: float(next(ticks)))
    timed = demo.TimedModel(lambda x: 2 * x, "cpu")
    for _ in range(3):
        assert torch.equal(timed(torch.ones(2)), torch.full((2,), 2.0))
        next(ticks)  # work between calls (metrics, conversions) is not counted
    assert timed.seconds == 3.0
