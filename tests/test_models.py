"""SPAN family: both Conv3XC forms, exact collapse, the SiLU quirk, checkpoint loading."""
import pytest
import torch
import torch.nn.functional as F

from dsclora.models import SPAN, CheckpointError, detect_config, load_model, read_state_dict

WEIGHTS = {
    "dscf_x4_team23.pth": (26, 26),
    "spantiny_ch26_x4_ntire24.pth": (26, 26),
    "span_ch28_x4_ntire24.pth": (28, 28),
    "span28c20_x4_team46.pth": (28, 20),
}


def authors_forward(sd, x, scale=4):
    """SPAN's official eval-form forward written straight from SPEC §2 with F.conv2d."""
    def conv(name, t, pad=1):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=pad)

    mean = torch.tensor([0.4488, 0.4371, 0.4040], dtype=x.dtype).view(1, 3, 1, 1)
    f0 = conv("conv_1.eval_conv", (x - mean) * 255.0)
    h, outs = f0, []
    for i in range(1, 7):
        out1 = conv(f"block_{i}.c1_r.eval_conv", h)
        out1 = F.silu(out1)  # the official in-place SiLU: the returned feature is activated
        o3 = conv(f"block_{i}.c3_r.eval_conv", F.silu(conv(f"block_{i}.c2_r.eval_conv", out1)))
        h = (o3 + h) * (torch.sigmoid(o3) - 0.5)
        outs.append((h, out1))
    cat = torch.cat([f0, conv("conv_2.eval_conv", outs[5][0]), outs[0][0], outs[5][1]], 1)
    y = conv("upsampler.0", conv("conv_cat", cat, pad=0))
    return F.pixel_shuffle(y, scale)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_shared_weights_load_and_match_authors_forward(shared, name):
    model = load_model(shared / "weights" / name)
    c, cc = WEIGHTS[name]
    assert (model.feature_channels, model.cat_channels, model.upscale) == (c, cc, 4)
    state, _ = read_state_dict(shared / "weights" / name)
    x = torch.rand(2, 3, 17, 23)
    with torch.no_grad():
        ours = model(x)
    expected = authors_forward(state, x)
    assert ours.shape == (2, 3, 68, 92)
    assert (ours - expected).abs().max() < 1e-5


def test_training_form_collapses_exactly():
    model = SPAN(26, upscale=3, form="train").double().train()
    for p in model.parameters():  # non-trivial values everywhere, biases included
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 3, 9, 14, dtype=torch.float64)
    with torch.no_grad():
        train_out, train_feats = model(x, return_features=True)
        model.eval()
        eval_out, eval_feats = model(x, return_features=True)
        model.reparameterize()
        assert not any(".sk." in k for k in model.state_dict())
        final = model(x)
    scale = train_out.abs().max()
    assert (train_out - eval_out).abs().max() <= 1e-12 * scale
    assert (final - eval_out).abs().max() == 0
    assert len(train_feats) == 6 and all(f.shape == (2, 26, 9, 14) for f in eval_feats)


def test_dscf_feature_set_is_the_inner_maps_of_blocks_1_to_3(shared):
    """The released DSCF code distils h1 = silu(c1(x)), h2 = silu(c2(h1)), o3 = c3(h2) of blocks 1-3."""
    state, _ = read_state_dict(shared / "weights" / "spantiny_ch26_x4_ntire24.pth")
    model = load_model(state)
    x = torch.rand(2, 3, 11, 9)

    def conv(name, t):
        return F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    h, expected = conv("conv_1.eval_conv", (x - mean) * 255.0), []
    for i in range(1, 4):
        h1 = F.silu(conv(f"block_{i}.c1_r.eval_conv", h))
        h2 = F.silu(conv(f"block_{i}.c2_r.eval_conv", h1))
        o3 = conv(f"block_{i}.c3_r.eval_conv", h2)
        expected += [h1, h2, o3]
        h = (o3 + h) * (torch.sigmoid(o3) - 0.5)
    with torch.no_grad():
        for fused in (False, True):
            out, features = model.use_fused_blocks(fused)(x, return_features="dscf")
            assert len(features) == 9
            assert max((f - e).abs().max().item() for f, e in zip(features, expected)) < 1e-4
            assert (out - model.use_fused_blocks(False)(x)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="return_features"):
        model(x, return_features="all")


def test_training_form_state_dict_round_trip():
    model = SPAN(16, cat_channels=12, upscale=2, form="train")
    loaded = load_model(model.state_dict())
    config = detect_config(model.state_dict())
    assert config.form == "train" and (config.feature_channels, config.cat_channels, config.upscale) == (16, 12, 2)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), loaded(x), atol=1e-6)


def test_block_returns_activated_first_conv():
    model = SPAN(8, form="eval").eval()
    block = model.block_1
    x = torch.randn(1, 8, 5, 5)
    _, h1 = block(x)
    assert torch.equal(h1, F.silu(block.c1_r(x)))


def test_load_model_names_bad_keys(tmp_path):
    state = SPAN(26, form="eval").state_dict()
    state["block_3.c2_r.eval_conv.weight"] = torch.zeros(26, 26, 1, 1)
    del state["conv_2.eval_conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_model(state)
    message = str(err.value)
    assert "conv_2.eval_conv.bias" in message and "extra.weight" in message
    assert "block_3.c2_r.eval_conv.weight" in message


def test_module_prefix_and_wrappers_are_unwrapped():
    state = SPAN(8, form="eval").state_dict()
    wrapped = {"params": {}, "params_ema": {f"module.{k}": v for k, v in state.items()}}
    model = load_model(wrapped)
    assert model.feature_channels == 8


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_model(tmp_path / "nope.pth")
