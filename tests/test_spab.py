"""The fused SPAB op (dsclora_kernels.spab) against its PyTorch reference: C++ and Triton
(interpreted on CPU tensors) backends, forward and gradients, custom-op machinery, SPAN's
fused path. Expected values are float64 runs of the reference."""
import numpy as np
import pytest
import torch
from PIL import Image

from dsclora.models import SPAN, load_model
from dsclora_kernels import _extension, _log, _native, spab, spab_reference, use_backend
from dsclora_kernels.spab import cpu as spab_cpu
from dsclora_kernels.spab import reference as spab_ref
from dsclora_kernels.spab import triton as spab_triton
needs_cpp = pytest.mark.skipif(_extension.load("spab") is None, reason="C++ extension _spab not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]
BOTH_PASSES = ("spab.forward", "spab.recompute")  # the Triton kernel's launches in forward + backward

# Tolerances of the interpreted Triton kernel, each about 4x the largest error its test showed over
# seeds 0-4 (interpreted fp32 = exact fp32 products; on the GPU fp32 runs tf32x3: the CUDA tests).
TRITON_FORWARD_TOL = 6e-5  # max |error| measured 1.4e-5 (C = 48; 5e-6 at C = 26 / 28)


def block_inputs(b, c, h, w, dtype=torch.float32, scale=3.0):
    """x with features of a few units, weights of the size of DSCF's (|w| ~ 0.1)."""
    x = torch.randn(b, c, h, w, dtype=dtype) * scale
    weights = []
    for _ in range(3):
        weights += [torch.randn(c, c, 3, 3, dtype=dtype) * 0.1, torch.randn(c, dtype=dtype) * 0.1]
    return x, weights


def reference64(x, weights):
    return spab_reference(x.double(), *(w.double() for w in weights))


def max_error(ours, expected):
    return max((a.double() - e).abs().max().item() for a, e in zip(ours, expected))


def grads(fn, inputs, g_out, g_h1):
    """Gradients of <out, g_out> + <h1, g_h1> (g_h1 None: h1 unused) w.r.t. all inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, h1 = fn(*inputs)
    loss = (out * g_out.to(out.dtype)).sum()
    if g_h1 is not None:
        loss = loss + (h1 * g_h1.to(h1.dtype)).sum()
    return torch.autograd.grad(loss, inputs)


def relative_l2(ours, expected):
    return max(((a.double() - e).norm() / e.norm()).item() for a, e in zip(ours, expected))


# ---- forward ----

CPP_SHAPES = [(1, 26, 9, 13), (2, 26, 1, 1), (1, 28, 17, 40), (3, 48, 5, 7), (1, 52, 6, 150),
              (2, 5, 4, 3), (1, 1, 3, 3), (1, 26, 70, 300)]


@needs_cpp
@pytest.mark.parametrize("shape", CPP_SHAPES)
def test_cpp_forward_matches_reference(shape):
    x, weights = block_inputs(*shape)
    with use_backend("cpp"):
        ours = spab(x, *weights)
    assert max_error(ours, reference64(x, weights)) <= 1e-4


@needs_cpp
def test_cpp_every_instruction_set(cpu_isa):
    x, weights = block_inputs(2, 26, 11, 37)
    g_out, g_h1 = torch.randn_like(x), torch.randn_like(x)
    with use_backend("cpp"):
        ours = spab(x, *weights)
        ours_grads = grads(spab, [x, *weights], g_out, g_h1)
    assert max_error(ours, reference64(x, weights)) <= 1e-4
    expected = grads(spab_reference, [t.double() for t in (x, *weights)], g_out.double(), g_h1.double())
    assert relative_l2(ours_grads, expected) <= 1e-4


TILINGS = [(8, 3, 3), (5, 1, 2), (13, 4, 1), (64, 2, 4)]  # strip width, band height, threads


@needs_cpp
@pytest.mark.parametrize("strip_width,band_height,threads", TILINGS)
def test_cpp_tilings_give_the_same_result(strip_width, band_height, threads):
    """Strips and bands recompute their halos: every tiling must equal the reference."""
    x, weights = block_inputs(2, 26, 10, 29)
    isa, packed = spab_cpu.packed_weights(weights)
    out, h1 = torch.empty_like(x), torch.empty_like(x)
    arg = spab_cpu.arg
    _native.call("spab", "forward", arg(x, "x"), arg(out, "out"), arg(h1, "h1"), packed, threads=threads, isa=isa,
                 strip_width=strip_width, band_height=band_height)
    assert max_error((out, h1), reference64(x, weights)) <= 1e-4


@needs_cpp
@pytest.mark.parametrize("strip_width,band_height,threads", TILINGS)
def test_cpp_recompute_under_any_tiling(strip_width, band_height, threads):
    """The backward's recompute (the forward's row groups, odd bands included) under every tiling."""
    x, weights = block_inputs(2, 26, 11, 29)
    g_out = torch.randn_like(x)
    isa, packed = spab_cpu.packed_weights(weights)
    outputs = tuple(torch.empty_like(x) for _ in range(6))
    arg = spab_cpu.arg
    _native.call("spab", "recompute", arg(x, "x"), arg(g_out, "g_out"), [arg(t, "out") for t in outputs], packed,
                 threads=threads, isa=isa, strip_width=strip_width, band_height=band_height)
    expected = spab_ref.spab_recompute_reference(x.double(), g_out.double(), *(w.double() for w in weights))
    assert max_error(outputs, expected) <= 1e-4


@needs_cpp
@pytest.mark.parametrize("strip_width,band_height,threads", TILINGS)
def test_cpp_backward_steps_under_any_tiling(strip_width, band_height, threads):
    """The backward's C++ steps: (conv(in, w) + add) * mul and the weight gradient."""
    arg, tiling = spab_cpu.arg, dict(strip_width=strip_width, band_height=band_height)
    inp, (w, b, *_) = block_inputs(2, 26, 10, 29)
    add, mul = torch.randn_like(inp), torch.randn_like(inp).contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(inp)
    isa = _native.isa("spab")
    packed = spab_cpu.pack(w, isa=isa)[0]
    _native.call("spab", "conv", arg(inp, "inp"), arg(out, "out"), arg(packed, "w"), arg(b, "b"), arg(add, "add"),
                 arg(mul, "mul"), threads=threads, isa=isa, **tiling)
    inp64, w64, b64 = inp.double(), w.double(), b.double()
    expected = (torch.nn.functional.conv2d(inp64, w64, b64, padding=1) + add) * mul
    assert max_error((out,), (expected,)) <= 1e-4

    g = torch.randn_like(inp)
    g_w, g_b = torch.empty_like(w), torch.empty_like(b)
    _native.call("spab", "wgrad", arg(g, "g"), arg(inp, "inp"), arg(g_w, "dw"), arg(g_b, "db"), threads=threads,
                 **tiling)
    _, expected_w, expected_b = spab_ref.conv_backward(g.double(), inp64, w64, (False, True, True))
    assert relative_l2((g_w, g_b), (expected_w, expected_b)) <= 1e-6
    g_w1 = torch.empty_like(w)  # the same result on one thread: deterministic
    _native.call("spab", "wgrad", arg(g, "g"), arg(inp, "inp"), arg(g_w1, "dw"), None, threads=1, **tiling)
    assert torch.equal(g_w, g_w1)


TRITON_SHAPES = [(1, 26, 9, 13), (2, 28, 1, 1), (1, 48, 6, 5), (2, 26, 3, 40)]


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_forward_matches_reference(shape, expect_launches):
    x, weights = block_inputs(*shape)
    with use_backend("triton"), expect_launches("spab.forward"):
        ours = spab(x, *weights)
    assert max_error(ours, reference64(x, weights)) <= TRITON_FORWARD_TOL


# The GPU launch table's tilings (32 x 32 frames, a panel size, programs per SM looping over the
# tiles) with the padded width each serves; warps and stages do not exist in the interpreter.
GPU_TILINGS = sorted({(key[2], config._replace(num_warps=4, num_stages=1))
                      for key, config in spab_triton._CONFIGS.items()})


@pytest.mark.parametrize("cp,config", GPU_TILINGS, ids=lambda v: f"cp{v}" if isinstance(v, int) else
                         f"panel{v.panel}-programs{v.programs_per_sm}")
def test_triton_gpu_tilings_under_the_interpreter(monkeypatch, expect_launches, cp, config):
    """The GPU's tilings, interpreted: forward and recompute on a 2 x 2-tile image."""
    monkeypatch.setattr(spab_triton, "INTERPRETER", config)
    x, weights = block_inputs(1, {32: 26, 64: 48}[cp], 30, 29)
    inputs = [t.requires_grad_() for t in (x, *weights)]
    g_out = torch.randn_like(x)
    with use_backend("triton"), expect_launches(*BOTH_PASSES):
        out, h1 = spab(*inputs)
        ours_grads = torch.autograd.grad((out * g_out).sum(), inputs)
    # measured max 7.2e-6 (C = 26) and 2.3e-5 (C = 48) forward, 1.3e-6 relative gradients
    assert max_error((out, h1), reference64(x.detach(), [w.detach() for w in weights])) <= {32: 3e-5, 64: 1e-4}[cp]
    expected = grads(spab_reference, [t.detach().double() for t in inputs], g_out.double(), None)
    assert relative_l2(ours_grads, expected) <= 6e-6


# |out| ~ 5: measured max 1.9e-3 (fp16, fp32 accumulation) and 3.1e-2 (bf16: 8-bit mantissas)
HALF_TOL = {torch.float16: 8e-3, torch.bfloat16: 0.125}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, expect_launches):
    x, weights = block_inputs(1, 26, 7, 9, dtype=dtype, scale=1.0)
    with use_backend("triton"), expect_launches("spab.forward"):
        ours = spab(x, *weights)
    assert ours[0].dtype == dtype
    assert max_error(ours, reference64(x, weights)) <= HALF_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
def test_any_input_layout(backend, layout, expect_launches):
    x, weights = block_inputs(2, 26, 6, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=3)[:, :, :, ::2]
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    with use_backend(backend), expect_launches("spab.forward", when=backend == "triton"):
        out, h1 = spab(x, *weights)
    assert out.stride() == h1.stride() == torch.empty_like(x).stride()
    assert max_error((out, h1), reference64(x, weights)) <= (2e-5 if backend == "triton" else 1e-4)  # measured 5.4e-6


# ---- gradients ----

@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("use_h1", [True, False])
def test_gradients_match_reference(backend, use_h1, expect_launches):
    x, weights = block_inputs(2, 26, 7, 9)
    g_out = torch.randn_like(x)
    g_h1 = torch.randn_like(x) if use_h1 else None
    expected = grads(spab_reference, [t.double() for t in (x, *weights)], g_out.double(), g_h1)
    with use_backend(backend), expect_launches(*BOTH_PASSES, when=backend == "triton"):
        ours = grads(spab, [x, *weights], g_out, g_h1)
    assert relative_l2(ours, expected) <= (3e-6 if backend == "triton" else 1e-4)  # Triton: measured 7.4e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_weights_only_and_from_sum(backend, expect_launches):
    """x without grad (the first block of a frozen stem) and stride-0 gradients from .sum()."""
    x, weights = block_inputs(1, 28, 5, 6)
    weights = [w.requires_grad_() for w in weights]
    with use_backend(backend), expect_launches(*BOTH_PASSES, when=backend == "triton"):
        out, h1 = spab(x, *weights)
        ours = torch.autograd.grad(out.sum() + h1.sum(), weights)
    ref_weights = [w.detach().double().requires_grad_() for w in weights]
    out, h1 = spab_reference(x.double(), *ref_weights)
    expected = torch.autograd.grad(out.sum() + h1.sum(), ref_weights)
    assert relative_l2(ours, expected) <= (1.5e-6 if backend == "triton" else 1e-4)  # Triton: measured 3.5e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_do_not_depend_on_the_incoming_gradients_layout(backend, expect_launches):
    """opcheck's AOT-dispatch check differentiates out.sum() + h1.sum() once eagerly (stride-0
    expanded dL/dout, dL/dh1) and once through AOTAutograd (contiguous tangents): the op's own
    work must give bit-identical gradients for both, so any difference there comes from the
    convolution backward it calls (cuDNN's algorithm choice and summation order on the GPU)."""
    x, weights = block_inputs(2, 26, 5, 7)
    g_expanded = torch.ones(()).expand(x.shape)
    with use_backend(backend), expect_launches("spab.recompute", when=backend == "triton"):
        expanded = torch.ops.dsclora.spab_backward(x, *weights, g_expanded, g_expanded, [True] * 7)
        contiguous = torch.ops.dsclora.spab_backward(x, *weights, g_expanded.contiguous(), g_expanded.contiguous(),
                                               [True] * 7)
    for a, b in zip(expanded, contiguous):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    """The backward formula (recompute + convolution backward) against finite differences."""
    x, weights = block_inputs(2, 3, 3, 4, dtype=torch.float64, scale=1.0)
    inputs = [t.requires_grad_() for t in (x, *weights)]
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *t: spab(*t), inputs, fast_mode=True)


# ---- custom-op machinery ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, expect_launches):
    x, weights = block_inputs(2, 26, 5, 7)
    inputs = [t.requires_grad_() for t in (x, *weights)]
    with use_backend(backend), expect_launches(*BOTH_PASSES, when=backend == "triton"):
        torch.library.opcheck(spab, tuple(inputs))


@needs_cpp
def test_torch_compile_fullgraph_forward_and_backward():
    x, weights = block_inputs(2, 26, 5, 7)

    def block_loss(x, *weights):
        out, h1 = spab(x * 2, *weights)
        return (out.sin() + h1).sum()

    compiled = torch.compile(block_loss, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (x, *weights)]
    with use_backend("cpp"):
        loss = compiled(*inputs)
        ours = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    out, h1 = spab_reference(ref_inputs[0] * 2, *ref_inputs[1:])
    expected = torch.autograd.grad((out.sin() + h1).sum(), ref_inputs)
    assert abs(loss.item() - (out.sin() + h1).sum().item()) <= 1e-3
    assert relative_l2(ours, expected) <= 1e-4


@needs_cpp
def test_packed_weights_follow_in_place_updates():
    x, weights = block_inputs(1, 26, 4, 5)
    with use_backend("cpp"):
        before = spab(x, *weights)[0]
        with torch.no_grad():
            weights[2].mul_(-1)  # an optimizer step on w2
        after = spab(x, *weights)[0]
    assert max_error((after,), reference64(x, weights)[:1]) <= 1e-4
    assert (after - before).abs().max() > 1e-2


@needs_cpp
def test_float64_on_cpu_falls_back_with_a_logged_reason():
    x, weights = block_inputs(1, 26, 3, 4, dtype=torch.float64)
    with use_backend("cpp"), pytest.warns(RuntimeWarning, match="float32 only"):
        _log.FALLBACKS.pop("spab:cpp:torch.float64", None)
        ours = spab(x, *weights)
    assert max_error(ours, reference64(x, weights)) <= 1e-12


@pytest.mark.parametrize("index,bad,match", [
    (0, torch.zeros(26, 5, 5), "x must be"),
    (3, torch.zeros(26, 26, 1, 1), "w2 must have shape"),
    (6, torch.zeros(25), "b3 must have shape"),
    (1, torch.zeros(26, 26, 3, 3, dtype=torch.float64), "w1 is torch.float64"),
])
def test_bad_inputs_are_named(index, bad, match):
    x, weights = block_inputs(1, 26, 3, 3)
    inputs = [x, *weights]
    inputs[index] = bad
    with pytest.raises(ValueError, match=match):
        spab(*inputs)


# ---- real features and the SPAN model ----

@pytest.fixture(scope="module")
def dscf_features(shared):
    """DSCF (C = 26) and its conv_1 features on a 24x40 crop of Set5 'baby' (|x| up to ~100)."""
    model = load_model(shared / "weights" / "dscf_x4_team23.pth")
    image = np.asarray(Image.open(shared / "data" / "Set5" / "baby.png").convert("RGB"), dtype=np.float32)
    lr = torch.from_numpy(image[200:224, 240:280] / 255.0).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        f0 = model.conv_1((lr - model.mean) * model.img_range)
    return model, lr, f0


@pytest.mark.parametrize("backend,blocks", [pytest.param("cpp", 6, marks=needs_cpp), ("triton", 2)])
def test_dscf_blocks_on_real_features(dscf_features, backend, blocks, expect_launches):
    model, _, h = dscf_features
    assert h.abs().max() > 10  # real feature magnitudes
    for block in model.blocks[:blocks]:  # the interpreter is slow: Triton runs the first two
        weights = [t.detach() for conv in (block.c1_r, block.c2_r, block.c3_r) for t in conv.weight_and_bias()]
        with torch.no_grad(), use_backend(backend), expect_launches("spab.forward", when=backend == "triton"):
            ours = spab(h, *weights)
        expected = reference64(h, weights)
        # |x| up to ~100; Triton: measured 8.6e-6
        assert max_error(ours, expected) <= (3.5e-5 if backend == "triton" else 1e-4)
        h = expected[0].float()


@needs_cpp
def test_fused_span_equals_unfused(dscf_features):
    model, lr, _ = dscf_features
    with torch.no_grad():
        expected, expected_features = model(lr, return_features=True)
        model.use_fused_blocks()
        try:
            ours, features = model(lr, return_features=True)
        finally:
            model.use_fused_blocks(False)
    assert all(b.fused is False for b in model.blocks)
    assert (ours - expected).abs().max() <= 1e-4
    assert max_error(features, expected_features) <= 1e-3  # features reach ~1e2


@needs_cpp
def test_fused_span_trains_like_unfused():
    """Training form: gradients reach the Conv3XC branches through weight_and_bias()."""
    model = SPAN(26, upscale=2, form="train").train()
    lr = torch.rand(2, 3, 6, 7)
    params = [p for name, p in model.named_parameters() if "eval_conv" not in name]  # unused in training
    expected = torch.autograd.grad(model(lr).square().mean(), params)
    model.use_fused_blocks()
    ours = torch.autograd.grad(model(lr).square().mean(), params)
    assert relative_l2(ours, expected) <= 1e-4


def test_fused_span_under_autocast(expect_launches):
    """Autocast hands the blocks bf16 features with fp32 weights: the fused path casts them."""
    model = SPAN(26, upscale=2, form="eval").eval()
    lr = torch.rand(1, 3, 6, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(lr)
        with use_backend("triton"), expect_launches("spab.forward"):
            ours = model.use_fused_blocks()(lr)
    assert ours.dtype == expected.dtype == torch.bfloat16
    # bf16 both ways, rounded in different places: measured 6e-3 of max |expected|
    assert (ours.float() - expected.float()).abs().max() <= 0.025 * expected.float().abs().max()


# ---- CUDA (the lent GPU machine; skipped elsewhere) ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("shape", [(1, 26, 9, 13), (2, 28, 1, 1), (1, 48, 33, 70), (1, 52, 17, 9), (1, 26, 256, 256)])
def test_cuda_forward_matches_reference(dtype, tolerance, shape):
    x, weights = block_inputs(*shape, scale=1.0 if dtype != torch.float32 else 3.0)
    x, weights = x.cuda().to(dtype), [w.cuda().to(dtype) for w in weights]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    expected = reference64(x, weights)
    for layout in (x, x_cl):
        ours = spab(layout, *weights)
        assert ours[0].dtype == dtype
        assert max_error(ours, expected) <= tolerance


@cuda
@pytest.mark.parametrize("use_h1", [True, False])
def test_cuda_gradients_match_reference(monkeypatch, use_h1):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32 convolution backward
    x, weights = block_inputs(2, 26, 37, 45)
    x, weights = x.cuda(), [w.cuda() for w in weights]
    g_out = torch.randn_like(x)
    g_h1 = torch.randn_like(x) if use_h1 else None
    expected = grads(spab_reference, [t.double() for t in (x, *weights)], g_out.double(), g_h1)
    ours = grads(spab, [x, *weights], g_out, g_h1)
    assert relative_l2(ours, expected) <= 1e-4


@cuda
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_cuda_opcheck_and_compile(allow_tf32):
    """opcheck compares eager and AOTAutograd gradients with float32 assert_close (atol 1e-5, rtol
    1.3e-6), i.e. it asks two runs of the backward to agree to the last few bits. The op's own
    work is layout-independent and deterministic (test above; no atomics in the Triton kernel),
    but the weight gradients come from cuDNN's convolution backward, whose default algorithms
    may split the 1,200-pixel sums differently from run to run: on an H200 the two runs differed
    by 7.6e-5 on 1.8 % of the elements: the size of a float32 summation-order difference in sums of
    1,200 products of a few units, far below TF32's ~1e-3 relative rounding, which one algorithm
    applies identically in both runs. So the check runs with deterministic cuDNN algorithms, and
    passes with TF32 allowed too (if it failed with TF32 only, TF32 would be the cause after all)."""
    x, weights = block_inputs(2, 26, 20, 30)
    inputs = [t.cuda().requires_grad_() for t in (x, *weights)]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=allow_tf32):
        torch.library.opcheck(spab, tuple(inputs))
    compiled = torch.compile(lambda *t: spab(*t)[0].square().sum(), fullgraph=True)
    loss = compiled(*inputs)
    out, _ = spab_reference(*(t.double() for t in inputs))
    assert abs(loss.item() - out.square().sum().item()) <= 1e-4 * out.square().sum().item()
