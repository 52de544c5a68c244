"""ConvLoRA (SPEC §3): layout, init, merge, freezing, and the released DSCF weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsclora.lora import (
    PAPER_RANKS, TARGET_LAYERS, ConvLoRA, apply_dsclora, lora_modules, lora_state_dict,
    merge_dsclora, rank_for,
)
from dsclora.models import SPAN, load_model, read_state_dict


def uniform_ranks(block, conv_2, upsampler):
    return {**{f"block_{i}": block for i in range(1, 7)}, "conv_2": conv_2, "upsampler.0": upsampler}


def randomize_adapters(model, std=0.05):
    """Non-zero B (and A) so that ΔW != 0."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.normal_(std=std)
            m.lora_B.normal_(std=std)


@pytest.mark.parametrize("c_in,c_out,k,rank", [(5, 7, 3, 2), (4, 4, 1, 3), (3, 48, 3, 16), (6, 2, 5, 1)])
def test_convlora_layout_and_forward_match_the_spec(c_in, c_out, k, rank):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2).double()
    lora = ConvLoRA.from_conv(conv, rank)  # alpha defaults to 2r
    assert lora.lora_A.shape == (rank * k, c_in * k) and lora.lora_B.shape == (c_out * k, rank * k)
    assert lora.scaling == 2.0
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(2, c_in, 6, 9, dtype=torch.float64)
    delta = (2 * rank / rank) * (lora.lora_B @ lora.lora_A).reshape(c_out, c_in, k, k)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, padding=k // 2)
    assert torch.allclose(lora(x), expected, rtol=0, atol=1e-12)


def test_convlora_init_is_loralib():
    conv = nn.Conv2d(26, 26, 3, padding=1)
    lora = ConvLoRA.from_conv(conv, rank=8)
    assert torch.count_nonzero(lora.lora_B) == 0
    bound = 1 / (26 * 3) ** 0.5  # kaiming_uniform(a=√5) over fan_in = C_in·k
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.9 * bound
    x = torch.randn(1, 26, 5, 5)
    assert torch.equal(lora(x), conv(x))


def test_merge_and_unmerge_are_exact():
    lora = ConvLoRA.from_conv(nn.Conv2d(4, 6, 3, padding=1), rank=2)
    torch.nn.init.normal_(lora.lora_B)
    base = lora.weight.detach().clone()
    x = torch.randn(2, 4, 7, 7)
    unmerged = lora(x)
    lora.merge()
    assert (lora(x) - unmerged).abs().max() <= 1e-5
    lora.unmerge()
    assert torch.equal(lora.weight, base) and torch.equal(lora(x), unmerged)


def test_apply_dsclora_targets_ranks_and_freezing():
    model = SPAN(26, form="eval")
    report = apply_dsclora(model)
    assert set(report.layers) == set(TARGET_LAYERS) and len(TARGET_LAYERS) == 20
    assert report.layers["block_1.c2_r.eval_conv"] == 8 and report.layers["block_4.c3_r.eval_conv"] == 12
    assert report.layers["block_6.c1_r.eval_conv"] == 4
    assert report.layers["conv_2.eval_conv"] == 24 and report.layers["upsampler.0"] == 16
    assert isinstance(model.upsampler[0], ConvLoRA) and model.upsampler[0].alpha == 32
    assert not isinstance(model.conv_1.eval_conv, ConvLoRA) and not isinstance(model.conv_cat, ConvLoRA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}" for t in TARGET_LAYERS for ab in "AB"}
    # A: (3r, 3C_in), B: (3C_out, 3r) -> 9r(C_in + C_out) per layer
    expected = sum(9 * r * (26 + 26) for r in report.layers.values()) - 9 * 16 * 26 + 9 * 16 * 48
    assert report.trainable == expected
    assert report.trainable + report.frozen == sum(p.numel() for p in model.parameters())
    assert "trainable" in str(report)


def test_student_starts_equal_to_base_and_only_adapters_get_gradients():
    base = SPAN(12, form="eval").eval()
    student = load_model(base.state_dict())
    apply_dsclora(student, ranks=uniform_ranks(2, 3, 4))
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(student(x), base(x))
    randomize_adapters(student)
    student(x).square().mean().backward()
    for name, p in student.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_dsclora_gives_plain_span_equal_to_student():
    student = SPAN(10, upscale=3, form="eval").eval()
    apply_dsclora(student, ranks=uniform_ranks(2, 2, 3))
    randomize_adapters(student)
    merged = merge_dsclora(student)
    assert not lora_modules(merged) and lora_modules(student)  # the student is untouched
    assert set(merged.state_dict()) == set(SPAN(10, upscale=3, form="eval").state_dict())
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        assert (merged(x) - student(x)).abs().max() <= 1e-5
        # β = 0 gives the base back exactly, β blends the weights linearly
        base = merge_dsclora(student, beta=0.0)
        half = merge_dsclora(student, beta=0.5)
    for key, w in base.state_dict().items():
        w_merged, w_half = merged.state_dict()[key], half.state_dict()[key]
        assert torch.allclose(w_half, 0.5 * w_merged + 0.5 * w, atol=1e-6), key
    assert torch.equal(base.upsampler[0].weight, student.upsampler[0].weight)


def test_lora_state_dict_holds_only_adapters():
    model = SPAN(8, form="eval")
    apply_dsclora(model, ranks=uniform_ranks(1, 1, 1))
    keys = set(lora_state_dict(model))
    assert len(keys) == 40 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)


def test_apply_dsclora_rejects_training_form_and_unknown_layers():
    with pytest.raises(ValueError, match="reparameterize"):
        apply_dsclora(SPAN(8, form="train"))
    with pytest.raises(KeyError, match="block_2.c1_r.eval_conv"):
        apply_dsclora(SPAN(8, form="eval"), ranks={"block_1": 2})
    model = SPAN(8, form="eval")
    apply_dsclora(model, ranks={"conv_1": 2}, targets=("conv_1.eval_conv",))
    with pytest.raises(ValueError, match="already"):
        apply_dsclora(model, ranks={"conv_1": 2}, targets=("conv_1.eval_conv",))
    with pytest.raises(KeyError, match="block_9"):
        apply_dsclora(SPAN(8, form="eval"), ranks={"block_9": 2}, targets=("block_9.c1_r.eval_conv",))
    with pytest.raises(ValueError, match="Conv3XC"):
        apply_dsclora(SPAN(8, form="eval"), ranks={"conv_2": 2}, targets=("conv_2",))


def test_rank_lookup_prefers_the_longest_prefix():
    ranks = {"block_1": 5, "block_1.c2_r": 7, "upsampler.0": 3}
    assert rank_for("block_1.c2_r.eval_conv", ranks) == 7
    assert rank_for("block_1.c1_r.eval_conv", ranks) == 5
    assert rank_for("upsampler.0", ranks) == 3
    with pytest.raises(KeyError):  # prefixes end at a dot: block_1 does not cover block_10
        rank_for("block_10.c1_r.eval_conv", ranks)


def test_released_dscf_is_spantiny_plus_paper_rank_loralib_updates(shared):
    """DSCF − SPAN-Tiny: only the 20 target weights differ (beyond fp32 noise), and each
    difference, matricised as (C_out·k, C_in·k) — the loralib layout — has its energy in the
    first r·k singular values for the paper's rank r (residual energy < 5 %), and the next
    smaller rank leaves at least 4x more (the gap in the spectrum is at r·k)."""
    dscf, _ = read_state_dict(shared / "weights" / "dscf_x4_team23.pth")
    tiny, _ = read_state_dict(shared / "weights" / "spantiny_ch26_x4_ntire24.pth")
    candidates = sorted(set(PAPER_RANKS.values()) | {2})
    target_weights = {f"{t}.weight" for t in TARGET_LAYERS}
    for key in tiny:
        diff = (dscf[key].double() - tiny[key].double())
        relative = diff.abs().max() / tiny[key].abs().max()
        if key not in target_weights:
            assert relative < 5e-5, key  # float32 rounding noise only (biases included)
            continue
        assert relative > 1.5e-4, key
        c_out, c_in, k, _ = diff.shape
        energy = torch.linalg.svdvals(diff.reshape(c_out * k, c_in * k)) ** 2
        rank = rank_for(key.removesuffix(".weight"), PAPER_RANKS)
        def residual(r):
            return (energy[r * k:].sum() / energy.sum()).sqrt()
        smaller = max(r for r in candidates if r < rank)
        assert residual(rank) < 0.05, (key, rank, residual(rank))
        assert residual(smaller) > 4 * residual(rank), (key, smaller, residual(smaller))
        if 2 * rank < c_out:  # HF peft's matricisation (C_out, C_in·k·k) does not explain it
            peft = torch.linalg.svdvals(diff.reshape(c_out, c_in * k * k)) ** 2
            assert (peft[rank:].sum() / peft.sum()).sqrt() > 0.2, key
