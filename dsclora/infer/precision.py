"""What float16/bfloat16 inference on the CPU runs, and the one-time note that says so."""
import torch

from dsclora_kernels._log import fallback

#: The CPU instructions that compute each low precision natively (torch.cpu's private probes,
#: stable since torch 2.1), as /proc/cpuinfo names them; amx_bf16 through the AMX tile probe
#: (every AMX CPU so far has AMX-BF16).
NATIVE_INSTRUCTIONS = {
    torch.bfloat16: {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"},
    torch.float16: {"amx_fp16": "_is_amx_fp16_supported"},
}

#: PyTorch's bfloat16 path against float32 (bench/bf16_quality.py; bench/RESULTS.md).
QUALITY_BF16 = "PSNR 52 dB mean, 46 dB worst on Set14"
#: Emulated (no native instructions) against float32, DSCF x4 at 256x256 on a 2-core AVX2 CPU.
SLOWDOWN = {torch.bfloat16: "13.5x", torch.float16: "9.8x"}


def native_instructions(dtype: torch.dtype) -> list[str]:
    """The instructions of this CPU that compute ``dtype`` natively (empty: none)."""
    probes = NATIVE_INSTRUCTIONS.get(dtype, {})
    return [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


def describe() -> str:
    """'bfloat16 native (amx_bf16), float16 emulated (no amx_fp16)' for this CPU."""
    def one(dtype):
        native = native_instructions(dtype)
        name = str(dtype).removeprefix("torch.")
        return (f"{name} native ({', '.join(native)})" if native else
                f"{name} emulated (no {' / '.join(NATIVE_INSTRUCTIONS[dtype])})")
    return ", ".join(one(dtype) for dtype in NATIVE_INSTRUCTIONS)


def note_cpu_half_precision(dtype: torch.dtype) -> None:
    """Record once (warning, ``dsclora info``) that ``dtype`` inference on the CPU is not the
    fused path, and whether this CPU computes it natively."""
    name = str(dtype).removeprefix("torch.")
    native = native_instructions(dtype)
    reason = f"the fused CPU kernels compute in float32 only, so {name} runs PyTorch's own layers"
    if native:
        reason += f" (oneDNN on this CPU's {', '.join(native)}; their speed against float32 is unmeasured)"
    else:
        reason += (f", emulated (this CPU has no {name} instructions: "
                   f"{', '.join(NATIVE_INSTRUCTIONS[dtype])}), slower than float32 "
                   f"({SLOWDOWN[dtype]} at 256x256 on a 2-core AVX2 CPU)")
    if dtype == torch.bfloat16:
        reason += f"; output {QUALITY_BF16} from float32's (bench/bf16_quality.py)"
    fallback(f"infer:cpu:{name}", reason)
