"""dsclora.infer and `dsclora infer`: merged fused network == reference SPAN, tiling, I/O, CLI, download."""
import hashlib
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dsclora.cli import main as cli_main
from dsclora_kernels import _log, spab_reference, use_backend
from dsclora.data.io import load_image, save_image
from dsclora.infer import (
    RECEPTIVE_RADIUS, DownloadError, FusedSpan, RemoteWeights, Upscaler, fetch, load, merge_span,
)
from dsclora.infer import precision
from dsclora.infer.batch import expand_inputs, output_paths
from dsclora.infer.merge import add_border_correction
from dsclora.infer.tiling import upscale_adaptive, upscale_tiled
from dsclora.infer.weights import cache_dir
from dsclora.models import SPAN, load_model

DSCF = "dscf_x4_team23.pth"


def random_span(c=8, cc=None, scale=2, form="train", std=0.1, dtype=torch.float64):
    """A SPAN with non-trivial values everywhere (biases included), in eval mode."""
    model = SPAN(c, cc, scale, form=form).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.eval()


def exact_network(merged, memory_format=torch.channels_last) -> FusedSpan:
    """The merged network in float64 with the reference SPAB (the fused op is float32)."""
    return FusedSpan(merged, dtype=torch.float64, memory_format=memory_format, spab=spab_reference)


def lr_image(shared, name="baby", crop=None) -> torch.Tensor:
    """A Set5 LR image (1, 3, H, W) float32, optionally cropped to crop=(h, w)."""
    array = np.asarray(Image.open(shared / "data" / "Set5_LR_bicubic" / "X4" / f"{name}x4.png"))
    if crop:
        array = array[:crop[0], :crop[1]]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def dscf(shared):
    return load_model(shared / "weights" / DSCF)


@pytest.fixture(scope="module")
def dscf_upscaler(dscf):
    return load(dscf, device="cpu")


# --- the merged network is the reference SPAN --------------------------------------------------

@pytest.mark.parametrize("cc,scale,form", [(None, 2, "train"), (6, 3, "eval"), (8, 4, "train")])
def test_fused_network_equals_reference_float64(cc, scale, form):
    model = random_span(8, cc, scale, form)
    merged = merge_span(model)
    for shape in [(2, 3, 9, 14), (1, 3, 1, 1), (1, 3, 1, 5), (1, 3, 2, 2), (1, 3, 3, 7), (3, 3, 16, 11)]:
        x = torch.rand(shape, dtype=torch.float64)
        with torch.no_grad():
            expected = model(x)
        for memory_format in (torch.channels_last, torch.contiguous_format):
            got = exact_network(merged, memory_format)(x)
            assert got.shape == expected.shape
            assert got.is_contiguous(memory_format=memory_format)  # the shuffle writes the caller's format
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"{shape} {memory_format}")


def test_merge_uses_the_training_branches_and_does_not_modify_the_model():
    model = random_span(8, form="train").train()  # training mode: branches, not eval_conv
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 7, 6, dtype=torch.float64)
    got = exact_network(merge_span(model))(x)
    with torch.no_grad():
        expected = model(x)  # training-form forward through the branches
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_conv_lora_adapters_are_merged():
    from dsclora.lora import PAPER_RANKS, apply_dsclora, lora_modules

    model = random_span(8, form="eval")
    apply_dsclora(model, ranks=dict.fromkeys(PAPER_RANKS, 2))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)  # a non-zero update
    x = torch.rand(2, 3, 6, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        plain = SPAN(8, upscale=2, form="eval").double().eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False)
        assert (plain(x) - expected).abs().max() > 1e-3  # the adapters do change the output
    got = exact_network(merge_span(model))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_dscf_equals_reference_forward(shared, dscf, dscf_upscaler):
    for name, crop in (("bird", None), ("woman", None), ("head", (1, 1)), ("baby", (2, 37)), ("butterfly", (33, 3))):
        x = lr_image(shared, name, crop)
        with torch.no_grad():
            expected = dscf(x)
        got = dscf_upscaler(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max() <= 1e-4, name
    batch = torch.cat([lr_image(shared, "baby", (20, 30)), lr_image(shared, "head", (20, 30))])
    noncontiguous = batch.transpose(2, 3).contiguous().transpose(2, 3)
    with torch.no_grad():
        expected = dscf(batch)
    assert (dscf_upscaler(noncontiguous) - expected).abs().max() <= 1e-4
    assert (dscf_upscaler(batch[1]) - expected[1]).abs().max() <= 1e-4  # (C, H, W) input


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dscf_on_each_fused_spab_backend(shared, dscf, backend):
    """The C++ kernel, and the Triton kernel under the interpreter (small image: it is slow)."""
    x = lr_image(shared, "head", (12, 20))
    with torch.no_grad():
        expected = dscf(x)
    network = FusedSpan(merge_span(dscf))
    with use_backend(backend):
        got = network(x)
    assert (got - expected).abs().max() <= 1e-4


def test_dscf_set5_psnr(shared, dscf_upscaler):
    from dsclora.evaluation import evaluate_folder

    result = evaluate_folder(dscf_upscaler, shared / "data" / "Set5", scale=4)
    assert result["n"] == 5
    assert abs(result["psnr"] - 31.7452) <= 0.002  # shared/README.md, dscf_x4_team23 on Set5
    assert abs(result["ssim"] - 0.889165) <= 2e-5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_fp32_equals_reference_and_fp16_keeps_the_psnr(shared, dscf, monkeypatch):
    from dsclora.evaluation import evaluate_folder

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    up32 = load(dscf, device="cuda", dtype=torch.float32)
    x = lr_image(shared, "bird")
    with torch.no_grad():
        expected = dscf(x)
    assert (up32(x) - expected).abs().max() <= 1e-4
    up32.tile = 24
    assert (up32(x) - expected).abs().max() <= 1e-4
    up16 = load(dscf, device="cuda")
    assert up16.network.dtype == torch.float16
    result = evaluate_folder(up16, shared / "data" / "Set5", scale=4, device="cuda")
    assert abs(result["psnr"] - 31.7452) <= 0.01


# --- tiling ------------------------------------------------------------------------------------

def test_tiles_padded_by_the_receptive_radius_are_exact(shared, dscf):
    x = lr_image(shared, "baby", (48, 60)).double()
    network = exact_network(merge_span(dscf))
    full = network(x)
    exact = upscale_tiled(network, x, 4, 16, RECEPTIVE_RADIUS)
    short = upscale_tiled(network, x, 4, 16, RECEPTIVE_RADIUS - 1)
    assert (exact - full).abs().max() <= 1e-12
    assert (short - full).abs().max() > 1e-11  # the radius is tight: one pixel less shows


def test_upscaler_tile_option(shared, dscf_upscaler):
    x = lr_image(shared, "bird", (40, 35))
    full = dscf_upscaler(x)
    dscf_upscaler.tile = 16
    try:
        tiled = dscf_upscaler(x)
    finally:
        dscf_upscaler.tile = None
    assert (tiled - full).abs().max() <= 1e-5


def test_out_of_memory_halves_the_tile():
    attempts, done = [], []

    def fn(t):  # "runs out of memory" on inputs wider than 60 pixels
        attempts.append(t.shape[-1])
        if t.shape[-1] > 60:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        done.append(t.shape[-1])
        return t.repeat_interleave(2, 2).repeat_interleave(2, 3) * 3

    x = torch.rand(1, 3, 100, 130)
    out = upscale_adaptive(fn, x, 2, None, pad=4)
    torch.testing.assert_close(out, x.repeat_interleave(2, 2).repeat_interleave(2, 3) * 3)
    assert attempts[:2] == [130, 65 + 4] and max(done) <= 60  # whole image, then 65, then 32


def test_bfloat16_network_reads_the_image_in_float32():
    """bf16 does not hold 8-bit levels: conv_1 and its border correction run in float32 on the
    float32 input, and the first block gets that result rounded once to bf16."""
    merged = merge_span(random_span(8))
    blocks_in = []

    def block(h, *weights):
        blocks_in.append(h)
        return h, h

    x = (torch.randint(0, 256, (1, 3, 7, 9)) / 255).contiguous(memory_format=torch.channels_last)
    FusedSpan(merged, dtype=torch.bfloat16, spab=block)(x)
    weight, bias = (t.float() for t in merged.conv_1)
    border = {k: t.float() for k, t in merged.conv_1_border.items()}
    expected = add_border_correction(F.conv2d(x, weight, bias, padding=1), border).bfloat16()
    assert blocks_in[0].dtype == torch.bfloat16
    torch.testing.assert_close(blocks_in[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("native,says", [([], r"emulated \(this CPU has no bfloat16 instructions"),
                                         (["amx_bf16"], "oneDNN on this CPU's amx_bf16")])
def test_half_precision_on_the_cpu_says_what_runs(monkeypatch, native, says):
    monkeypatch.setattr(_log, "FALLBACKS", {})
    monkeypatch.setattr(precision, "native_instructions", lambda dtype: native)
    with pytest.warns(RuntimeWarning, match=says):
        FusedSpan(merge_span(random_span(8)), dtype=torch.bfloat16)
    assert "fused CPU kernels compute in float32 only" in _log.FALLBACKS["infer:cpu:bfloat16"]


def test_dsclora_info_says_which_low_precision_this_cpu_computes(monkeypatch):
    from dsclora.info import report

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.describe() == "bfloat16 native (amx_bf16), float16 emulated (no amx_fp16)"
    assert precision.describe() in report()


def test_non_finite_half_precision_output_is_recomputed_in_float32():
    model = random_span(8, form="eval", dtype=torch.float32)
    upscaler = load(model, device="cpu", dtype=torch.bfloat16)
    x = torch.rand(1, 3, 5, 6)
    real = upscaler.network

    class Overflowing:  # a low-precision overflow
        dtype, device = real.dtype, real.device

        def __call__(self, t):
            return real(t) * float("inf")

    upscaler.network = Overflowing()
    with pytest.warns(RuntimeWarning, match="recomputing in float32"):
        got = upscaler(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=0, atol=1e-4)


# --- arrays, PIL images, alpha, gray, 16 bits --------------------------------------------------

@pytest.fixture(scope="module")
def small_upscaler():
    return Upscaler(merge_span(random_span(8, form="eval", std=0.05, dtype=torch.float32)))


def test_array_kinds(small_upscaler):
    up, rng = small_upscaler, np.random.default_rng(0)
    rgb = rng.random((7, 9, 3), dtype=np.float32)
    raw = up(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).clamp(0, 1).numpy()
    out = up(rgb)
    assert out.dtype == np.float32 and out.shape == (14, 18, 3)
    np.testing.assert_allclose(out, raw, atol=1e-5)
    for dtype, peak in ((np.uint8, 255), (np.uint16, 65535)):  # 16 bits kept, not 8
        quantised = (rgb * peak).round().astype(dtype)
        out = up(quantised)
        assert out.dtype == dtype
        expected = up(quantised.astype(np.float32) / peak)
        np.testing.assert_allclose(out / peak, expected, rtol=0, atol=0.5 / peak + 1e-6)
    gray = rgb[..., 0]
    gray_out = up(gray)
    expected = up(torch.from_numpy(gray).expand(3, -1, -1)).mean(0).clamp(0, 1).numpy()
    assert gray_out.shape == (14, 18)
    np.testing.assert_allclose(gray_out, expected, atol=1e-5)
    rgba = np.dstack([rgb, gray])
    out = up(rgba)
    np.testing.assert_allclose(out[..., :3], raw, atol=1e-5)
    np.testing.assert_allclose(out[..., 3], gray_out, atol=1e-5)  # alpha: the gray path
    opaque = up(np.dstack([rgb, np.ones_like(gray)]))
    assert (opaque[..., 3] == 1).all()
    with pytest.raises(ValueError, match="shape"):
        up(np.zeros((4, 4, 5), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        up(np.zeros((4, 4, 3), np.int8))


def test_tensor_result_keeps_the_callers_memory_format(small_upscaler):
    x = torch.rand(2, 4, 5, 7)  # RGBA: the colour and gray paths, concatenated
    fast = small_upscaler.upscale_tensor(x, any_layout=True)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        got = small_upscaler(x.contiguous(memory_format=memory_format))
        assert got.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(got, fast, rtol=0, atol=0)
    assert small_upscaler(x[0]).is_contiguous()  # (C, H, W)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16", "P"])
def test_pil_images_keep_their_mode(small_upscaler, mode):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), "RGBA").convert(mode)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (6, 5), dtype=np.uint16))
    out = small_upscaler(image)
    assert out.size == (10, 12)
    assert out.mode == ("RGB" if mode == "P" else mode)


# --- the command line --------------------------------------------------------------------------

def test_cli_batch_keeps_alpha_gray_16bit_and_survives_a_corrupt_file(tmp_path, capsys):
    model = random_span(8, form="eval", dtype=torch.float32)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(2)
    src = tmp_path / "in"
    src.mkdir()
    save_image(src / "a_rgba.png", rng.random((9, 7, 3)), alpha=rng.random((9, 7)))
    save_image(src / "b_16.png", rng.random((8, 6, 3)), bit_depth=16)
    save_image(src / "c_gray.png", rng.random((5, 8, 3)), gray=True)
    (src / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save_image(tmp_path / "e_single.jpg", rng.random((6, 6, 3)))
    out = tmp_path / "out"
    code = cli_main(["infer", str(src), str(tmp_path / "*.jpg"), "-o", str(out), "--weights", str(weights),
                     "--suffix", "_x2", "--ext", "png", "--tile", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "d_corrupt.png" in err and err.count("FAILED") == 2  # once as it happens, once in the summary
    assert "4 of 5 inputs upscaled" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_rgba_x2.png", "b_16_x2.png", "c_gray_x2.png", "e_single_x2.png"]
    up = Upscaler(merge_span(model))
    rgba = load_image(out / "a_rgba_x2.png")
    source = load_image(src / "a_rgba.png")
    assert rgba.alpha is not None and rgba.rgb.shape == (18, 14, 3)
    expected = up(np.dstack([source.rgb, source.alpha]))
    np.testing.assert_allclose(np.dstack([rgba.rgb, rgba.alpha]), expected, atol=0.5 / 255 + 1e-6)
    deep = load_image(out / "b_16_x2.png")
    assert deep.bit_depth == 16 and not deep.gray
    np.testing.assert_allclose(deep.rgb, up(load_image(src / "b_16.png").rgb), atol=1e-4)
    gray = load_image(out / "c_gray_x2.png")
    assert gray.gray and gray.rgb.shape == (10, 16, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}  # not mkstemp's 0o600


def test_cli_output_scale_and_argument_errors(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(random_span(8, scale=4, form="eval", dtype=torch.float32).state_dict(), weights)
    save_image(tmp_path / "x.png", np.random.default_rng(3).random((6, 10, 3)))
    assert cli_main(["infer", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--weights", str(weights),
                     "--scale", "2"]) == 0
    assert Image.open(tmp_path / "o" / "x.png").size == (20, 12)
    assert cli_main(["infer", str(tmp_path / "x.png"), "-o", str(tmp_path), "--weights", str(weights)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert cli_main(["infer", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"),
                     "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert cli_main(["infer", str(tmp_path / "nothing*.png"), "-o", str(tmp_path / "o")]) == 1
    assert "nothing*.png" in capsys.readouterr().err  # no image at all: the model is not even loaded
    if not torch.cuda.is_available():
        assert cli_main(["infer", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--weights", str(weights),
                         "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_inputs_and_output_paths(tmp_path):
    for name in ("a.png", "b.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files, missing = expand_inputs([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "none*.png")])
    assert [f.name for f in files] == ["a.png", "b.jpg"]
    assert list(missing) == [str(tmp_path / "none*.png")]
    other = tmp_path / "sub"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="both be written"):
        output_paths([tmp_path / "a.png", other / "a.jpg"], tmp_path / "out", ext="png")


# --- the default weights -----------------------------------------------------------------------

def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DSCLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dsclora"
    monkeypatch.setenv("DSCLORA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_download_into_the_cache_with_checksum(monkeypatch, tmp_path):
    monkeypatch.setenv("DSCLORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "release.pth"
    torch.save(random_span(8, form="eval", dtype=torch.float32).state_dict(), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    remote = RemoteWeights("tiny", source.as_uri(), digest, "tiny.pth")
    path = fetch(remote)
    assert path == tmp_path / "cache" / "tiny.pth" and path.read_bytes() == source.read_bytes()
    source.unlink()
    assert fetch(remote) == path  # cached: no second download
    monkeypatch.setattr("dsclora.infer.upscaler.fetch", lambda: path)
    assert load(None, device="cpu").scale == 2  # no weights: the default model


def test_wrong_checksum_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DSCLORA_CACHE", str(cache))
    source = tmp_path / "release.pth"
    source.write_bytes(b"not the released file")
    with pytest.raises(DownloadError, match="sha256") as info:
        fetch(RemoteWeights("tiny", source.as_uri(), "0" * 64, "tiny.pth"))
    assert "--weights" in str(info.value)
    assert list(cache.iterdir()) == []


def test_offline_error_says_how_to_pass_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("DSCLORA_CACHE", str(tmp_path / "cache"))
    missing = (tmp_path / "nowhere.pth").as_uri()
    with pytest.raises(DownloadError, match="--weights PATH"):
        fetch(RemoteWeights("tiny", missing, "0" * 64, "tiny.pth"))
    assert list((tmp_path / "cache").iterdir()) == []
