"""dsclora.metrics and the C++ metrics kernels against a straightforward float64 version of
BasicSR's formulas (SPEC §7) written here independently."""
import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from dsclora import metrics
from dsclora_kernels import _extension, _log, use_backend
from dsclora_kernels import metrics as metrics_ops
from dsclora_kernels.metrics import reference as metrics_reference


def y_of(img):
    """(H, W, 3) 0-255 -> Y, BasicSR's bgr2ycbcr(y_only) on [0, 1] samples, times 255 / 255."""
    x = img.astype(np.float64) / 255.0
    return (x @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0 * 255.0


def planes_of(img, border, channel):
    img = img.astype(np.float64)
    if border:
        img = img[border:-border, border:-border]
    return [y_of(img)] if channel == "y" else [img[..., c] for c in range(img.shape[2])]


def naive_psnr(sr, hr, border, channel):
    a, b = np.stack(planes_of(sr, border, channel)), np.stack(planes_of(hr, border, channel))
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def naive_ssim_plane(a, b):
    """11x11 window (outer product of a normalised Gaussian), explicit valid correlation."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    window = np.outer(g, g)

    def filt(x):
        return np.einsum("ijkl,kl->ij", sliding_window_view(x, (11, 11)), window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filt(a), filt(b)
    s11, s22, s12 = filt(a * a) - mu1**2, filt(b * b) - mu2**2, filt(a * b) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return ssim_map.mean()


def naive_ssim(sr, hr, border, channel):
    return np.mean([naive_ssim_plane(a, b) for a, b in zip(planes_of(sr, border, channel),
                                                             planes_of(hr, border, channel))])


def image_pair(shape, seed, noise=12.0, as_uint8=True):
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, shape).astype(np.float64)
    hr = (hr + np.roll(hr, 1, 0) + np.roll(hr, 1, 1)) / 3  # some structure
    sr = np.clip(hr + rng.normal(0, noise, shape), 0, 255)
    if as_uint8:
        return np.round(sr).astype(np.uint8), np.round(hr).astype(np.uint8)
    return sr, hr


CASES = [((32, 40, 3), 0, "y"), ((33, 47, 3), 4, "y"), ((29, 31, 3), 3, "rgb"), ((11, 11, 3), 0, "rgb"),
         ((50, 19, 3), 2, "y"), ((64, 64, 3), 4, "rgb")]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("shape,border,channel", CASES)
def test_numpy_metrics_match_naive(backend, shape, border, channel):
    for seed, as_uint8 in ((0, True), (1, False)):
        sr, hr = image_pair(shape, seed, as_uint8=as_uint8)
        with use_backend(backend):
            got_psnr = metrics.psnr(sr, hr, border, channel)
            got_ssim = metrics.ssim(sr, hr, border, channel)
        assert abs(got_psnr - naive_psnr(sr, hr, border, channel)) < 1e-10
        assert abs(got_ssim - naive_ssim(sr, hr, border, channel)) < 1e-10


@pytest.mark.parametrize("shape,border,channel", CASES)
def test_torch_metrics_match_naive(shape, border, channel):
    pairs = [image_pair(shape, seed) for seed in range(3)]
    sr = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)  # non-contiguous uint8
    hr = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32)).permute(0, 3, 1, 2)
    got_psnr = metrics.psnr_torch(sr, hr, border, channel)
    got_ssim = metrics.ssim_torch(sr, hr, border, channel)
    assert got_psnr.shape == got_ssim.shape == (3,) and got_ssim.dtype == torch.float64
    for i, (a, b) in enumerate(pairs):
        assert abs(got_psnr[i].item() - naive_psnr(a, b, border, channel)) < 1e-10
        assert abs(got_ssim[i].item() - naive_ssim(a, b, border, channel)) < 1e-10


def test_identical_images_and_options_change_results():
    sr, hr = image_pair((40, 40, 3), 2)
    assert metrics.psnr(hr, hr) == math.inf and metrics.ssim(hr, hr) == pytest.approx(1.0, abs=1e-12)
    assert torch.isinf(metrics.psnr_torch(torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4))).all()
    values = {(b, c): metrics.psnr(sr, hr, b, c) for b in (0, 4) for c in ("y", "rgb")}
    assert len(set(values.values())) == 4


def test_quantize():
    x = torch.tensor([-0.2, 0.0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 0.5, 1.0, 1.3])
    assert metrics.quantize(x).tolist() == [0, 0, 0, 1, 128, 255, 255]


def test_bad_inputs_are_named():
    a = np.zeros((20, 20, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(a, np.zeros((20, 21, 3)))
    with pytest.raises(ValueError, match="channel"):
        metrics.ssim(a, a, channel="lab")
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        metrics.psnr(np.zeros((20, 20, 4)), np.zeros((20, 20, 4)))
    with pytest.raises(ValueError, match="border"):
        metrics.psnr(a, a, border=10)
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(a, a, border=5)
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        metrics.ssim_torch(torch.zeros(3, 20, 20), torch.zeros(3, 20, 20))
    with pytest.raises(ValueError, match="\\(H, W, C\\)"):
        metrics.psnr(np.zeros((20, 20)), np.zeros((20, 20)))


# ---------------------------------------------------------------------------- C++ kernels


def test_metrics_extension_is_built():
    assert _extension.load("metrics") is not None, _extension.status("metrics")


@pytest.mark.parametrize("shape", [(11, 11), (12, 300), (257, 13), (40, 531)])
def test_cpp_ssim_matches_reference_and_is_thread_independent(shape, monkeypatch, cpu_isa):
    rng = np.random.default_rng(shape[1])
    big = rng.random((shape[0] + 6, shape[1] * 2 + 5)) * 255
    a = big[3:-3, 2 : 2 + shape[1] * 2 : 2]  # strided columns: copied before the kernel
    noisy = np.clip(big + rng.normal(0, 9, big.shape), 0, 255)
    b = noisy[::-1][3:-3, 5 : 5 + shape[1]]  # negative row stride: passed to the kernel as it is
    expected = metrics_ops.ssim_mean_reference(np.ascontiguousarray(a), np.ascontiguousarray(b))
    assert abs(expected - naive_ssim_plane(a, b)) < 1e-10
    results = set()
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        with use_backend("cpp"):
            results.add(metrics_ops.ssim_mean(a, b))
    assert len(results) == 1 and abs(results.pop() - expected) < 1e-10


def test_cpp_rgb_to_y_matches_reference(cpu_isa):
    img = np.random.default_rng(9).random((17, 23, 3)) * 255
    for view in (img, img[::-1, ::2], np.asfortranarray(img)):
        with use_backend("cpp"):
            got = metrics_ops.rgb_to_y(view)
        np.testing.assert_allclose(got, y_of(view), rtol=0, atol=1e-10)
        np.testing.assert_allclose(metrics_ops.rgb_to_y_reference(view), y_of(view), rtol=0, atol=1e-10)


def test_cpp_path_is_used_by_default(monkeypatch):
    def forbidden(*args):
        raise AssertionError("reference path used although the C++ kernel is available")

    monkeypatch.setattr(metrics_reference, "ssim_mean", forbidden)
    monkeypatch.setattr(metrics_reference, "rgb_to_y", forbidden)
    sr, hr = image_pair((30, 30, 3), 4)
    assert abs(metrics.ssim(sr, hr, 2) - naive_ssim(sr, hr, 2, "y")) < 1e-10


def test_missing_extension_falls_back_with_a_logged_reason(monkeypatch):
    monkeypatch.setitem(_extension._MODULES, "metrics", None)
    monkeypatch.setitem(_extension._REASONS, "metrics", "not built (test)")
    monkeypatch.setattr(_log, "FALLBACKS", {})
    sr, hr = image_pair((30, 30, 3), 5)
    with pytest.warns(RuntimeWarning, match="not built \\(test\\)"):
        value = metrics.ssim(sr, hr)
    assert abs(value - naive_ssim(sr, hr, 0, "y")) < 1e-10
    assert _log.FALLBACKS.get("ssim:cpp") == "not built (test)"
