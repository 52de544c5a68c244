"""Exports other tools load: the official layout, spandrel's layout, ONNX; checkpoint metadata."""
import copy
import enum
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from dsclora.cli import main
from dsclora.export import export, identity_branches, official_state_dict, span_config
from dsclora.lora import apply_dsclora, merge_dsclora
from dsclora.models import SPAN, CheckpointError, collapse_branches, load_model, read_state_dict

DSCF = "weights/dscf_x4_team23.pth"


def randomized(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """``model`` with every parameter redrawn (biases included) so nothing is trivially zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def lora_model(base: SPAN) -> SPAN:
    """``base`` with DSCLoRA adapters whose B is non-zero (a non-trivial ΔW everywhere)."""
    model = copy.deepcopy(base)
    apply_dsclora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 1e-3)
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def set5_lr(shared, scale: int = 4) -> list[torch.Tensor]:
    """Set5's golden LR images (1, 3, H, W) in [0, 1]. Natural images, not noise: on uniform
    noise SPAN's activations grow so large that float32 itself is only ~1e-3 accurate."""
    folder = shared / "data" / "Set5_LR_bicubic" / f"X{scale}"
    return [
        torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        for f in sorted(folder.glob("*.png"))
    ]


# --- official layout ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_export_of_dscf_is_the_released_file(shared, tmp_path, suffix):
    released, _ = read_state_dict(shared / DSCF)
    path = export(load_model(shared / DSCF), "official", tmp_path / f"dscf{suffix}")
    state, metadata = read_state_dict(path)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in released.items()}
    assert len(state) == 44
    for key, value in released.items():
        assert torch.equal(state[key], value), key
    SPAN(26, 26, 4, form="eval").load_state_dict(state, strict=True)  # the official key layout
    if suffix == ".safetensors":
        assert (metadata["feature_channels"], metadata["merged"], metadata["form"]) == ("26", "true", "eval")
    else:
        assert metadata == {}  # a plain state dict, like the released file


def test_official_export_folds_training_branches_and_unmerged_adapters(tmp_path):
    trained = randomized(SPAN(6, 5, upscale=2, form="train")).double().train()
    x = torch.rand(2, 3, 7, 9, dtype=torch.float64)
    path = export(trained, "official", tmp_path / "train.safetensors")
    assert not any(".sk." in k or ".conv." in k for k in read_state_dict(path)[0])
    assert (outputs(load_model(path).double(), x) - outputs(trained, x)).abs().max() < 1e-5

    base = load_model(path)
    adapted = lora_model(base)
    x = torch.rand(1, 3, 8, 8)
    merged = outputs(merge_dsclora(adapted).eval(), x)
    assert (outputs(base, x) - merged).abs().max() > 1e-4  # the adapters change the output
    exported = load_model(export(adapted, "official", tmp_path / "lora.safetensors"))
    assert (outputs(exported, x) - merged).abs().max() < 1e-5
    metadata = read_state_dict(tmp_path / "lora.safetensors")[1]
    assert json.loads(metadata["lora"])["conv_2.eval_conv"] == {"rank": 24, "alpha": 48.0}


def test_safetensors_metadata_restores_normalisation(tmp_path):
    model = randomized(SPAN(4, upscale=3, img_range=1.0, rgb_mean=(0.1, 0.2, 0.3), form="eval")).eval()
    path = export(model, "official", tmp_path / "norm.safetensors")
    metadata = read_state_dict(path)[1]
    assert metadata["architecture"] == "SPAN" and metadata["upscale"] == "3"
    loaded = load_model(path)
    assert (loaded.img_range, loaded.mean.flatten().tolist()) == (1.0, model.mean.flatten().tolist())
    x = torch.rand(1, 3, 5, 6)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    # Without metadata the shapes alone cannot tell: the defaults come back, and differ.
    plain = load_model(read_state_dict(path)[0])
    assert not torch.allclose(outputs(plain, x), outputs(model, x))


@pytest.mark.parametrize("bad, message", [
    ({"feature_channels": "5"}, "'feature_channels' = 5"),
    ({"upscale": "x"}, "malformed metadata"),
    ({"rgb_mean": "[0.5]"}, "'rgb_mean' has 1 values"),
    ({"architecture": "RRDBNet"}, "not 'SPAN'"),
])
def test_inconsistent_metadata_is_a_clear_error(tmp_path, bad, message):
    from safetensors.torch import save_file

    model = SPAN(4, form="eval")
    path = tmp_path / "bad.safetensors"
    metadata = {"architecture": "SPAN", "feature_channels": "4", **bad}
    save_file(official_state_dict(model), str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_bad_output_path_and_format(tmp_path):
    model = SPAN(4, form="eval")
    with pytest.raises(ValueError, match=r"\.pth or \.safetensors"):
        export(model, "official", tmp_path / "model.bin")
    with pytest.raises(ValueError, match="unknown export format"):
        export(model, "tflite", tmp_path / "model.tflite")
    assert list(tmp_path.iterdir()) == []


# --- spandrel layout -------------------------------------------------------------------------

@pytest.mark.parametrize("c_in, c_out", [(3, 5), (4, 4), (1, 2)])
def test_identity_branches_collapse_exactly(c_in, c_out):
    weight, bias = torch.randn(c_out, c_in, 3, 3), torch.randn(c_out)
    b = identity_branches(weight, bias)
    collapsed = collapse_branches(b["conv.0.weight"], b["conv.0.bias"], b["conv.1.weight"], b["conv.1.bias"],
                                  b["conv.2.weight"], b["conv.2.bias"], b["sk.weight"], b["sk.bias"])
    assert torch.equal(collapsed[0], weight) and torch.equal(collapsed[1], bias)


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """The torchvision names spandrel's *import* touches, and nothing else.

    spandrel imports all its architectures eagerly; LaMa and RestoreFormer import
    ``torchvision.transforms.functional`` (InterpolationMode, rotate, normalize). PyPI's
    torchvision does not import beside this CPU-only torch and a matching build is GBs of CUDA,
    so the test installs this stub instead: the SPAN architecture never calls torchvision.
    """
    tv, transforms, functional = (types.ModuleType(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional"))

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is stubbed out in dsclora's tests")

    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    functional.rotate = functional.normalize = unavailable
    tv.transforms, transforms.functional = transforms, functional
    return {module.__name__: module for module in (tv, transforms, functional)}


@pytest.fixture(scope="module")
def spandrel():
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel is not installed (pip install --no-deps spandrel einops)")
    with pytest.MonkeyPatch.context() as patch:
        try:
            import torchvision  # noqa: F401
        except Exception:  # missing, or a CPU/CUDA mismatch that fails at import
            for name, module in _torchvision_stub().items():
                patch.setitem(sys.modules, name, module)
        import spandrel

        yield spandrel


def check_spandrel_file(spandrel, model: SPAN, path) -> None:
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert descriptor.architecture.id == "SPAN"
    assert descriptor.scale == model.upscale
    assert descriptor.model.hyperparameters["feature_channels"] == model.feature_channels
    x = torch.rand(2, 3, 11, 14)
    expected = outputs(model, x)
    assert (outputs(descriptor.model.eval(), x) - expected).abs().max() <= 1e-5
    ours = load_model(path)  # our loader reads the training form too
    assert span_config(ours).form == "train"
    assert (outputs(ours, x) - expected).abs().max() <= 1e-5


def test_spandrel_loads_dscf(spandrel, shared, tmp_path):
    dscf = load_model(shared / DSCF)
    check_spandrel_file(spandrel, dscf, export(dscf, "spandrel", tmp_path / "dscf.pth"))


def test_spandrel_loads_a_dsclora_merged_model(spandrel, shared, tmp_path):
    merged = merge_dsclora(lora_model(load_model(shared / DSCF))).eval()
    check_spandrel_file(spandrel, merged, export(merged, "spandrel", tmp_path / "merged.safetensors"))


def test_spandrel_loads_other_widths_and_scales(spandrel, tmp_path):
    model = randomized(SPAN(6, upscale=2, form="eval")).eval()
    check_spandrel_file(spandrel, model, export(model, "spandrel", tmp_path / "x2.pth"))


def test_spandrel_refuses_what_it_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="cat_channels 3"):
        export(SPAN(4, 3, form="eval"), "spandrel", tmp_path / "c.pth")
    with pytest.raises(ValueError, match="img_range 1.0"):
        export(SPAN(4, img_range=1.0, form="eval"), "spandrel", tmp_path / "r.pth")
    assert list(tmp_path.iterdir()) == []


# --- ONNX --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnxruntime():
    pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (pip install 'dsclora[export]')")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def run_onnx(onnxruntime, path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def test_onnx_fp32_matches_pytorch_at_any_batch_and_size(onnxruntime, shared, tmp_path):
    import onnx

    dscf = load_model(shared / DSCF)
    path = export(dscf, "onnx", tmp_path / "dscf.onnx")
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {p.key: p.value for p in proto.metadata_props}["feature_channels"] == "26"
    baby, bird, *others = set5_lr(shared)
    batch = torch.cat([baby[..., :33, :47], bird[..., 5:38, 9:56]])  # batch 2, odd size
    for x in [batch, bird, *others, baby[..., :1, :5]]:
        y = run_onnx(onnxruntime, path, x)
        assert y.shape == (x.shape[0], 3, 4 * x.shape[2], 4 * x.shape[3])
        assert (y - outputs(dscf, x)).abs().max() <= 1e-4


def test_onnx_fp16(onnxruntime, tmp_path):
    model = randomized(SPAN(8, upscale=2, form="train"), std=0.1).eval()
    path = export(model, "onnx", tmp_path / "half.onnx", dtype=torch.float16)
    x = torch.rand(2, 3, 9, 12)
    y = run_onnx(onnxruntime, path, x.half())
    assert y.dtype == torch.float16 and y.shape == (2, 3, 18, 24)
    error = (y.float() - outputs(model, x)).abs()
    assert error.max() <= 2e-2 and error.mean() <= 2e-3  # fp16 rounding, not a wrong graph


def test_onnx_without_the_onnx_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"dsclora\[export\]"):
        export(SPAN(4, form="eval"), "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_onnx_export_leaves_no_file(onnxruntime, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export(SPAN(4, form="eval"), "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, name", [("official", "m.safetensors"), ("official", "m.pth"), ("onnx", "m.onnx")])
def test_export_writes_only_through_its_own_temporary(onnxruntime, monkeypatch, tmp_path, fmt, name):
    """While the file is written, its folder holds our one temporary and nothing a library made
    (safetensors' save_file would add a ``.tmpXXXXXX`` a kill there leaves behind)."""
    from pathlib import Path

    seen, write_bytes = [], Path.write_bytes

    def listing_write(self, data):
        seen.append(sorted(p.name for p in self.parent.iterdir()))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", listing_write)
    export(SPAN(4, form="eval"), fmt, tmp_path / name)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(f".{name}."), seen
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# --- command line ------------------------------------------------------------------------------

def test_export_command(tmp_path, capsys):
    model = randomized(SPAN(4, upscale=2, form="eval")).eval()
    source = export(model, "official", tmp_path / "model.safetensors")
    assert main(["export", "--weights", str(source), "--format", "spandrel", "-o", str(tmp_path / "s.pth")]) == 0
    x = torch.rand(1, 3, 6, 6)
    assert torch.equal(outputs(load_model(tmp_path / "s.pth"), x), outputs(model, x))
    narrow = export(SPAN(4, 3, form="eval"), "official", tmp_path / "narrow.pth")
    assert main(["export", "--weights", str(narrow), "--format", "spandrel", "-o", str(tmp_path / "n.pth")]) == 1
    assert "cat_channels" in capsys.readouterr().err
    assert main(["export", "--weights", str(source), "--format", "official", "--dtype", "fp16", "-o", "x.pth"]) == 2
    assert "dsclora export: --dtype fp16 applies to --format onnx only" in capsys.readouterr().err
