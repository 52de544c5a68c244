"""The ``dsclora infer`` file pipeline: batching, integer conversion by bands, encoding options,
the automatic tile, per-file errors (no timings: throughput is bench/bench_pipeline.py's)."""
import numpy as np
import pytest
import torch
from PIL import Image

from dsclora.cli import main as cli_main
from dsclora.data.io import _quantize, load_image, save_image, save_samples
from dsclora.infer import Upscaler, merge_span
from dsclora.infer import encode as encode_module
from dsclora.infer.batch import upscale_image
from dsclora.infer.encode import EncodeOptions, quantize
from dsclora.infer.pipeline import upscale_files
from dsclora.infer.stages import StageClock
from dsclora.infer.tiling import auto_tile, network_bytes
from dsclora.models import SPAN


def random_span(c=8, scale=2):
    model = SPAN(c, upscale=scale, form="eval")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_span()


@pytest.fixture
def upscaler(model):
    return Upscaler(merge_span(model))


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("band", [1, 7, 1 << 20])
def test_quantize_by_bands_equals_the_float_path(monkeypatch, bits, band):
    monkeypatch.setattr(encode_module, "BAND_PIXELS", band)
    y = torch.rand(4, 13, 6) * 1.2 - 0.1  # out of range values too
    y[0, 0, 0] = 0.5 / 255  # a rounding tie
    got = quantize(y[:3], bits)
    assert got.dtype == (np.uint8 if bits == 8 else np.uint16) and got.shape == (13, 6, 3)
    np.testing.assert_array_equal(got, _quantize(y[:3].permute(1, 2, 0).numpy(), bits))
    rgba = quantize(y, bits)
    np.testing.assert_array_equal(rgba, _quantize(y.permute(1, 2, 0).numpy(), bits))
    gray = quantize(y, bits, gray=True)
    assert gray.shape == (13, 6, 2)
    np.testing.assert_array_equal(gray[..., 1], rgba[..., 3])
    mean = _quantize(y[:3].mean(0).numpy(), bits)
    assert np.abs(gray[..., 0].astype(int) - mean).max() <= 1


def test_encoding_options(tmp_path):
    smooth = np.add.outer(np.arange(40), np.arange(50))[..., None] * np.array([1, 2, 3])
    samples = (smooth % 256).astype(np.uint8)
    sizes = {}
    for level in (0, 9):
        save_samples(tmp_path / f"l{level}.png", samples, png_level=level)
        sizes[level] = (tmp_path / f"l{level}.png").stat().st_size
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"l{level}.png")), samples)
    assert sizes[9] < sizes[0]
    for ext in ("jpg", "webp"):
        save_samples(tmp_path / f"q10.{ext}", samples, quality=10)
        save_samples(tmp_path / f"q95.{ext}", samples, quality=95)
        assert (tmp_path / f"q10.{ext}").stat().st_size < (tmp_path / f"q95.{ext}").stat().st_size
    deep = (np.random.default_rng(1).random((5, 4, 3)) * 65535).astype(np.uint16)
    save_samples(tmp_path / "deep.png", deep, png_level=0)
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.bit_depth == 16
    np.testing.assert_array_equal(np.round(loaded.rgb * 65535).astype(np.uint16), deep)
    with pytest.raises(ValueError, match="16-bit"):
        save_samples(tmp_path / "deep.jpg", deep)
    with pytest.raises(ValueError, match="alpha"):
        save_samples(tmp_path / "a.jpg", np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="png_level"):
        EncodeOptions(png_level=10)
    with pytest.raises(ValueError, match="quality"):
        EncodeOptions(quality=0)


def _sources(folder, rng):
    """Mixed sources in name order: same-size runs, other sizes, alpha, grey, 16-bit, a corrupt file."""
    folder.mkdir()
    specs = {"a": (9, 7), "b": (9, 7), "c": (9, 7), "d": (5, 6), "e": (9, 7), "f": (9, 7)}
    for name, (h, w) in specs.items():
        save_image(folder / f"{name}.png", rng.random((h, w, 3)))
    save_image(folder / "g_rgba.png", rng.random((9, 7, 3)), alpha=rng.random((9, 7)))
    (folder / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save_image(folder / "i.png", rng.random((9, 7, 3)))
    save_image(folder / "j_gray16.png", rng.random((9, 7, 3)), gray=True, bit_depth=16)
    save_image(folder / "k.png", rng.random((9, 7, 3)))
    return sorted(folder.iterdir())


@pytest.mark.parametrize("batch,encoders", [(1, 1), (3, 2), (8, 3)])
def test_pipeline_equals_one_image_at_a_time(tmp_path, upscaler, batch, encoders):
    files = _sources(tmp_path / "in", np.random.default_rng(batch))
    pairs = [(f, tmp_path / "out" / f.name) for f in files]
    (tmp_path / "out").mkdir()
    failures = upscale_files(upscaler, pairs, batch=batch, encoders=encoders, progress=False)
    assert list(failures) == [str(tmp_path / "in" / "h_corrupt.png")]
    assert "cannot be read" in failures[str(tmp_path / "in" / "h_corrupt.png")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f.name for f in files if "corrupt" not in f.name]
    for src, dst in pairs:
        if "corrupt" in src.name:
            continue
        source, got = load_image(src), load_image(dst)
        rgb, alpha = upscale_image(upscaler, source)
        assert got.bit_depth == source.bit_depth and got.gray == source.gray
        bits = source.bit_depth
        expected = _quantize(rgb.mean(2) if source.gray else rgb, bits)
        actual = _quantize(got.rgb[..., 0] if source.gray else got.rgb, bits)
        # one image per call is the image path exactly; a batch may move a sample by one step
        # (float32 GEMMs sum in another order for another batch size), a grey mean likewise
        limit = 0 if batch == 1 and not source.gray else 1
        assert np.abs(actual.astype(int) - expected).max() <= limit, src.name
        if alpha is not None:
            assert np.abs(_quantize(got.alpha, 8).astype(int) - _quantize(alpha, 8)).max() <= limit


def test_batched_network_is_the_single_image_network(upscaler):
    x = torch.rand(3, 3, 11, 8)
    together = upscaler.upscale_tensor(x)
    for i in range(3):
        torch.testing.assert_close(upscaler.upscale_tensor(x[i:i + 1]), together[i:i + 1], rtol=0, atol=1e-5)


def test_auto_tile_follows_the_memory_model(model):
    per_pixel = network_bytes(1, 26, 4, 4)
    assert per_pixel == (6 * 26 + 3) * 4  # the blocks dominate at C = 26, x4
    assert network_bytes(10, 8, 4, 2) == 10 * (8 + 6 * 16 + 3) * 2  # the upsampler dominates
    assert auto_tile((1, 3, 64, 64), 26, 4, 4, budget=per_pixel * 64 * 64, pad=24) is None
    tile = auto_tile((1, 3, 1080, 1920), 26, 4, 4, budget=512 << 20, pad=24)
    assert network_bytes((tile + 48) ** 2, 26, 4, 4) <= 512 << 20 < network_bytes((tile + 50) ** 2, 26, 4, 4)
    assert auto_tile((4, 3, 100, 100), 26, 4, 4, budget=1, pad=24) == 32  # never below MIN_TILE

    up = Upscaler(merge_span(model), tile="auto")
    whole = Upscaler(merge_span(model))
    x = torch.rand(1, 3, 90, 130)
    from dsclora.infer import tiling

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiling, "CPU_BUDGET", network_bytes(100 * 100, 8, 2, 4))
        assert up.tile_for(x.shape) == 100 - 2 * up.tile_pad
        torch.testing.assert_close(up.upscale_tensor(x), whole.upscale_tensor(x), rtol=0, atol=1e-5)
    assert up.tile_for(x.shape) is None  # the default CPU budget holds this small image


def test_stage_clock_names_the_slowest_stage_per_worker():
    clock = StageClock({"decode": 2, "network": 1, "encode": 4})
    clock.busy.update(decode=3.0, network=1.0, encode=3.9)
    assert clock.bound() == "decode"
    clock.busy["network"] = 1.6
    assert clock.bound() == "network"


def test_cli_encoding_and_tile_options(tmp_path, model, capsys):
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    save_image(tmp_path / "x.png", np.random.default_rng(4).random((6, 10, 3)))
    base = ["infer", str(tmp_path / "x.png"), "--weights", str(weights)]
    assert cli_main([*base, "-o", str(tmp_path / "a"), "--png-level", "9", "--tile", "auto"]) == 0
    assert cli_main([*base, "-o", str(tmp_path / "b"), "--png-level", "0", "--tile", "4"]) == 0
    assert cli_main([*base, "-o", str(tmp_path / "c"), "--ext", "jpg", "--quality", "90", "--batch", "2"]) == 0
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    assert a.stat().st_size < b.stat().st_size
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    for bad in (["--png-level", "10"], ["--quality", "0"], ["--tile", "-1"], ["--tile", "big"]):
        with pytest.raises(SystemExit) as exc:
            cli_main([*base, "-o", str(tmp_path / "d"), *bad])
        assert exc.value.code == 2
    assert cli_main([*base, "-o", str(tmp_path / "d"), "--batch", "0"]) == 2
    capsys.readouterr()
