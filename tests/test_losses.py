"""DSCLoRA's loss (SPEC §4): weights, terms, the affinity term, gradients, errors."""
import pytest
import torch

from dsclora.losses import DSCLoRALoss, affinity_distillation


def naive_affinity(f_s, f_t):
    """SPEC §4 written out: per-pixel unit vectors, A = F̂ᵀF̂, mean |A_S − A_T|."""
    def affinity(f):
        x = f.flatten(2)
        x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
        return x.transpose(1, 2) @ x
    return (affinity(f_s) - affinity(f_t)).abs().mean()


def make_inputs(b=2, c_s=5, c_t=7, h=6, w=5, scale=2, dtype=torch.float64):
    sr_s = torch.rand(b, 3, h * scale, w * scale, dtype=dtype, requires_grad=True)
    sr_t, hr = torch.rand_like(sr_s.detach()), torch.rand_like(sr_s.detach())
    f_s = [torch.randn(b, c_s, h, w, dtype=dtype, requires_grad=True) for _ in range(6)]
    f_t = [torch.randn(b, c_t, h, w, dtype=dtype, requires_grad=True) for _ in range(6)]
    return sr_s, hr, sr_t, f_s, f_t


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_total_is_the_weighted_sum_of_the_spec_terms(reconstruction):
    sr_s, hr, sr_t, f_s, f_t = make_inputs()
    loss = DSCLoRALoss(rec=0.7, ts=0.3, ad=0.05, reconstruction=reconstruction)
    total, terms = loss(sr_s, hr, sr_t, f_s, f_t)
    diff = sr_s - hr
    rec = diff.abs().mean() if reconstruction == "l1" else diff.square().mean()
    ts = (sr_s - sr_t).abs().mean()
    ad = sum(naive_affinity(a, b) for a, b in zip(f_s, f_t))
    assert torch.allclose(terms["rec"], rec) and torch.allclose(terms["ts"], ts)
    assert torch.allclose(terms["ad"], ad, rtol=1e-6)
    assert torch.allclose(total, 0.7 * rec + 0.3 * ts + 0.05 * ad, rtol=1e-6)
    assert all(not t.requires_grad for t in terms.values())


def test_affinity_term_is_fakds_spatial_affinity_loss():
    """FAKD (github Vincent-Hoo/Knowledge-Distillation-for-Super-resolution): F/(‖F‖ + 1e-7) per
    pixel, S = F̂ᵀF̂ (bmm), nn.L1Loss (mean over b, i, j), summed over the layers by FeatureLoss.
    Ours uses eps = 1e-8: with features of norm ~1 the two differ by ~1e-7 relative."""
    def fakd_similarity(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return (f / (f.pow(2).sum(1).sqrt().unsqueeze(1) + 1e-7)).transpose(1, 2).bmm(
            f / (f.pow(2).sum(1).sqrt().unsqueeze(1) + 1e-7))

    _, _, _, f_s, f_t = make_inputs(b=3, c_s=4, c_t=9, h=7, w=5)
    fakd = sum(torch.nn.functional.l1_loss(fakd_similarity(a), fakd_similarity(b)) for a, b in zip(f_s, f_t))
    ours = affinity_distillation(f_s, f_t)
    assert torch.allclose(ours, fakd, rtol=1e-5) and not torch.allclose(ours, fakd * 1.001, rtol=1e-5)


def test_terms_keep_their_graph_on_request():
    sr_s, hr, sr_t, f_s, f_t = make_inputs(b=1, h=3, w=3)
    _, terms = DSCLoRALoss()(sr_s, hr, sr_t, f_s, f_t, keep_graph=True)
    assert all(t.requires_grad for t in terms.values())
    (g_ad,) = torch.autograd.grad(terms["ad"], [f_s[0]])
    assert g_ad.abs().sum() > 0


def test_defaults_are_the_papers():
    assert DSCLoRALoss().weights == {"rec": 1.0, "ts": 0.1, "ad": 0.01}
    assert DSCLoRALoss().reconstruction == "l1"


def test_gradients_reach_the_student_only_and_pass_gradcheck():
    sr_s, hr, sr_t, f_s, f_t = make_inputs(b=1, c_s=2, c_t=3, h=2, w=3)
    sr_t.requires_grad_(True)
    total, _ = DSCLoRALoss()(sr_s, hr, sr_t, f_s, f_t)
    total.backward()
    assert sr_s.grad is not None and all(f.grad is not None for f in f_s)
    assert sr_t.grad is None and all(f.grad is None for f in f_t)  # the teacher is a constant

    t_feats = [f.detach() for f in f_t]
    def fn(sr, *feats):
        return DSCLoRALoss()(sr, hr, sr_t.detach(), list(feats), t_feats)[0]
    inputs = (sr_s.detach().requires_grad_(True), *[f.detach().requires_grad_(True) for f in f_s])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_zero_weight_terms_are_skipped_and_need_no_teacher():
    sr_s, hr, *_ = make_inputs()
    total, terms = DSCLoRALoss(rec=1, ts=0, ad=0)(sr_s, hr)
    assert set(terms) == {"rec"} and torch.allclose(total, (sr_s - hr).abs().mean())
    assert not DSCLoRALoss(ts=0, ad=0).needs_teacher and DSCLoRALoss().needs_teacher


def test_bf16_features_are_measured_in_float32():
    _, _, _, f_s, f_t = make_inputs(dtype=torch.float32)
    full = affinity_distillation(f_s, f_t)
    half = affinity_distillation([f.bfloat16() for f in f_s], [f.bfloat16() for f in f_t])
    assert half.dtype == torch.float32 and torch.allclose(half, full, rtol=0.05)


def test_bad_arguments_are_named():
    sr_s, hr, sr_t, f_s, f_t = make_inputs()
    with pytest.raises(ValueError, match="reconstruction"):
        DSCLoRALoss(reconstruction="huber")
    with pytest.raises(ValueError, match="ts"):
        DSCLoRALoss(ts=-1)
    with pytest.raises(ValueError, match="sr_t"):
        DSCLoRALoss()(sr_s, hr, None, f_s, f_t)
    with pytest.raises(ValueError, match="features"):
        DSCLoRALoss()(sr_s, hr, sr_t)
    with pytest.raises(ValueError, match="F3"):
        bad = list(f_t)
        bad[2] = torch.randn(2, 7, 5, 5, dtype=torch.float64)
        DSCLoRALoss()(sr_s, hr, sr_t, f_s, bad)
    with pytest.raises(ValueError, match="6 student vs 5"):
        affinity_distillation(f_s, f_t[:5])
    with pytest.raises(ValueError, match="all loss weights"):
        DSCLoRALoss(rec=0, ts=0, ad=0)(sr_s, hr)
