"""Every Triton launch the fused ops make on a GPU fits every supported GPU's budget, proven
without a GPU: each launch is compiled ahead of time for sm_80, sm_86, sm_89 and sm_90 by
``dsclora_kernels.triton_budget`` (shared memory from the compiled metadata, registers and spills
from Triton's bundled ptxas, tensor-core instructions from its cuobjdump). Compiling takes a few minutes of CPU on a cold Triton cache."""
import os
from collections import Counter

from dsclora_kernels import gpu_arch, triton_budget
from dsclora_kernels.affinity import triton as affinity_triton
from dsclora_kernels.spab import triton as spab_triton
from dsclora_kernels.triton_support import AotCase


def test_every_triton_launch_fits_every_gpu():
    rows = triton_budget.measure(jobs=min(4, os.cpu_count() or 1))
    print("\n" + triton_budget.table(rows))
    # every kernel x dtype x mode on every architecture was compiled
    covered = Counter((r.case.kernel, r.case.dtype, r.case.channels, r.case.mode, r.case.arch) for r in rows)
    spab = {(k, d, ch, m, a) for k, d, ch, m, a in covered if k == "spab"}
    assert len(spab) == len(spab_triton.DTYPES) * len(spab_triton.AOT_CHANNELS) * 2 * len(gpu_arch.ARCHS)
    affinity_modes = {(d, ch, m) for k, d, ch, m, a in covered if k == "affinity"}
    for dtype, channels, mode in affinity_modes:  # some config of each mode is left on each architecture
        assert all(("affinity", dtype, channels, mode, a.name) in covered for a in gpu_arch.ARCHS), (dtype, mode)
    # fp32: 3 precisions x (no gradient, student gradient); fp64: ieee x 2
    assert len(affinity_modes) == len(affinity_triton.AOT_CHANNELS) * (3 * 2 + 2)
    for row in rows:  # fp32: TF32 products run on tensor cores (HMMA on sm_8x, HGMMA on sm_90), "ieee" not
        if row.case.kernel == "affinity" and row.case.dtype == "float32":
            assert (row.tensor_core_ops > 0) == ("tf32" in row.case.mode), row.case
    problems = triton_budget.problems(rows)
    assert not problems, "\n".join(problems)


def test_the_budget_check_catches_what_does_not_fit():
    """problems() flags shared memory over the limit, spills beyond the case's tolerance, missing
    tensor-core instructions where a case needs them and too few resident programs."""
    case = AotCase("spab", "float16", "26", "forward", "test", "sm_86", (), spills_tolerated=0, needs_tensor_cores=True)
    fits = triton_budget.Row(case, shared=101_376, regs=255, spill_stores=0, spill_loads=0, tensor_core_ops=36,
                             blocks_per_sm=2, programs_per_sm=2, seconds=0.0)
    assert triton_budget.problems([fits]) == []
    for bad, match in [(dict(shared=101_377), "shared memory"), (dict(spill_stores=4), "spills"),
                       (dict(blocks_per_sm=1), "1 programs fit"), (dict(tensor_core_ops=0), "tensor-core")]:
        (problem,) = triton_budget.problems([fits._replace(**bad)])
        assert match in problem and "sm_86" in problem
    any_spill = fits._replace(case=case._replace(spills_tolerated=None), spill_stores=400)
    assert triton_budget.problems([any_spill]) == []
    some_spill = case._replace(spills_tolerated=16)
    assert triton_budget.problems([fits._replace(case=some_spill, spill_stores=16)]) == []
    (problem,) = triton_budget.problems([fits._replace(case=some_spill, spill_stores=20)])
    assert "spills 20 B" in problem and "tolerated: 16 B" in problem
    no_mma_needed = fits._replace(case=case._replace(needs_tensor_cores=False), tensor_core_ops=0)
    assert triton_budget.problems([no_mma_needed]) == []


def test_each_case_states_its_budget():
    """The backends' own policies: 16-bit SPAB never spills, fp32 SPAB may; every SPAB launch and
    every TF32 affinity launch needs tensor cores; affinity spills only within SPILLS_TOLERATED."""
    arch = gpu_arch.arch(86)
    for case in spab_triton.aot_cases(arch):
        assert case.needs_tensor_cores
        assert case.spills_tolerated == (None if case.dtype == "float32" else 0), case
    modes = set()
    for case in affinity_triton.aot_cases(arch):
        modes.add(case.mode)
        assert case.needs_tensor_cores == ("tf32" in case.mode), case
        expected = affinity_triton.SPILLS_TOLERATED.get((arch.name, case.channels, case.mode), 0)
        assert case.spills_tolerated == expected, case
    assert any("ieee" in m for m in modes) and any("tf32" in m for m in modes)


def test_resident_blocks_per_sm():
    sm80 = gpu_arch.arch(80)
    assert sm80.blocks_per_sm(shared=10_240, regs=255, num_warps=4) == 2  # 2 x 4 warps x 32 x 256 registers
    assert sm80.blocks_per_sm(shared=10_240, regs=128, num_warps=4) == 4
    assert sm80.blocks_per_sm(shared=82_000, regs=32, num_warps=4) == 2  # 2 x (82,000 + 1 KiB) <= 164 KiB
    assert gpu_arch.arch(86).blocks_per_sm(shared=82_000, regs=32, num_warps=4) == 1
    assert gpu_arch.arch(75) == gpu_arch.arch(86)  # unlisted: the smallest budget
