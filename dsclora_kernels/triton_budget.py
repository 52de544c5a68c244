"""Ahead-of-time resource check of every Triton launch the fused ops make on a GPU; no GPU needed.

Every Triton backend in ``KERNELS`` lists its launches per architecture and builds each with its
launcher's own code (``aot_cases`` / ``aot_launch``, the interface of ``triton_support``: the
same arguments, constexprs, num_warps and num_stages), specialised by Triton's own binder and compiled with ``triton.compile`` for ``GPUTarget("cuda", capability,
32)`` for every architecture in ``gpu_arch.ARCHS``. Shared memory is the compiled metadata;
registers and spills come from Triton's bundled ``ptxas -v`` on the generated PTX (the command
Triton itself runs to make the cubin); tensor-core instructions are counted in the cubin's SASS
(Triton's bundled ``cuobjdump -sass``: HMMA, and HGMMA on sm_90). A launch is over budget when its
shared memory exceeds the architecture's per-block maximum, when it spills more registers than
its case tolerates, when it must use tensor cores and its SASS has no tensor-core instruction, or
(persistent kernels) when fewer of its programs fit on one SM than the launcher starts per SM.

``python -m dsclora_kernels.triton_budget`` (or ``python bench/triton_budget.py``) prints the
table. Triton's interpreter cannot compile: under TRITON_INTERPRET=1, ``measure`` runs the
compilation in a child process without it. Compiled kernels land in Triton's cache, so a second
run is fast.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from typing import NamedTuple, Optional

import torch

from . import gpu_arch
from .affinity import triton as affinity_triton
from .spab import triton as spab_triton
from .triton_support import AotCase, AotLaunch, triton_interpreting

#: The Triton backends, by op name (each a module with ``aot_cases`` and ``aot_launch``).
KERNELS = {"spab": spab_triton, "affinity": affinity_triton}


class Row(NamedTuple):
    case: AotCase
    shared: int
    regs: int
    spill_stores: int
    spill_loads: int
    tensor_core_ops: int  # HMMA / HGMMA instructions in the SASS
    blocks_per_sm: int  # resident blocks per SM by shared memory and registers
    programs_per_sm: Optional[int]  # how many the launcher starts per SM (persistent kernels)
    seconds: float


def _archs() -> dict[str, gpu_arch.Arch]:
    return {a.name: a for a in gpu_arch.ARCHS}


def cases(archs: Optional[tuple[str, ...]] = None, kernels: tuple[str, ...] = tuple(KERNELS)) -> list[AotCase]:
    """Every launch of ``kernels`` on CUDA tensors, on every architecture of ``gpu_arch.ARCHS``
    (or those named in ``archs``)."""
    return [case for arch in gpu_arch.ARCHS if archs is None or arch.name in archs
            for name in kernels for case in KERNELS[name].aot_cases(arch)]


@contextlib.contextmanager
def _ptxas_log():
    """Collects what Triton's ptxas runs print (their ``-v`` statistics) inside the block."""
    import triton

    log = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        yield log


def compile_usage(kernel, args: tuple, kwargs: dict, capability: int) -> tuple[int, int, int, int, int]:
    """(shared bytes, registers, spill store bytes, spill load bytes, tensor-core instructions) of
    ``kernel[grid](*args, **kwargs)`` compiled for compute capability ``capability``, as
    ``JITFunction.run`` would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    with _ptxas_log() as log:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        if not log.getvalue():  # from Triton's cache: run the same ptxas command again
            backend.make_cubin(compiled.asm["ptx"], {}, options, capability)
    text = log.getvalue()
    entry = text[text.index(f"entry function '{compiled.metadata.name}'"):]  # its statistics, not a callee's
    regs = int(re.search(r"Used (\d+) registers", entry).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry).groups())
    return compiled.metadata.shared, regs, stores, loads, tensor_core_instructions(compiled.asm["cubin"])


def tensor_core_instructions(cubin: bytes) -> int:
    """How many HMMA / HGMMA (tensor-core matrix multiply) instructions the cubin's SASS holds."""
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    return len(re.findall(r"\b(?:HMMA|HGMMA)\.", sass))


def _launch(case: AotCase, arch: gpu_arch.Arch) -> AotLaunch:
    return KERNELS[case.kernel].aot_launch(arch, *case.build)


def _measure_one(case: AotCase) -> Row:
    arch = _archs()[case.arch]
    start = time.perf_counter()
    launch = _launch(case, arch)
    shared, regs, stores, loads, mma = compile_usage(launch.kernel, launch.args, launch.kwargs, arch.capability)
    return Row(case, shared, regs, stores, loads, mma, arch.blocks_per_sm(shared, regs, launch.kwargs["num_warps"]),
               launch.programs_per_sm, time.perf_counter() - start)


def measure(jobs: int = 2, archs: Optional[tuple[str, ...]] = None,
            kernels: tuple[str, ...] = tuple(KERNELS)) -> list[Row]:
    """Compile every case of ``cases(archs, kernels)`` with ``jobs`` processes; rows in case order."""
    if triton_interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", __name__, "--json", f"--jobs={jobs}", "--kernels", *kernels,
                   *(["--archs", *archs] if archs else [])]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return [_row_from_json(r) for r in json.loads(done.stdout)]
    todo = cases(archs, kernels)
    if jobs <= 1:
        return [_measure_one(c) for c in todo]
    # spawn: each worker imports Triton afresh (no compiler state shared over fork)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_measure_one, todo))


def _row_from_json(r: dict) -> Row:
    case = AotCase(**{**r["case"], "build": ()})
    return Row(case, *(r[k] for k in Row._fields[1:]))


def problems(rows: list[Row]) -> list[str]:
    """Why rows are over budget (empty: every launch fits)."""
    archs = _archs()
    found = []
    for row in rows:
        c, arch = row.case, archs[row.case.arch]
        name = f"{c.kernel} {c.dtype} C={c.channels} {c.mode} [{c.config}] on {c.arch}"
        if row.shared > arch.smem_per_block:
            found.append(f"{name}: {row.shared} B shared memory > {arch.smem_per_block} B per block")
        if c.spills_tolerated is not None and row.spill_stores > c.spills_tolerated:
            found.append(f"{name}: spills {row.spill_stores} B of registers (tolerated: {c.spills_tolerated} B)")
        if c.needs_tensor_cores and not row.tensor_core_ops:
            found.append(f"{name}: no tensor-core instruction (HMMA / HGMMA) in its SASS")
        if row.programs_per_sm is not None and row.blocks_per_sm < row.programs_per_sm:
            found.append(f"{name}: {row.blocks_per_sm} programs fit on an SM, the launcher starts "
                         f"{row.programs_per_sm} per SM")
    return found


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    archs = _archs()
    header = ("kernel", "dtype", "C", "mode", "config", "arch", "shared B", "limit B", "regs", "spill B",
              "MMA ops", "fit/SM")
    lines = [header]
    for row in rows:
        c = row.case
        fit = str(row.blocks_per_sm) + (f" (runs {row.programs_per_sm})" if row.programs_per_sm else "")
        lines.append((c.kernel, c.dtype, c.channels, c.mode, c.config, c.arch, str(row.shared),
                      str(archs[c.arch].smem_per_block), str(row.regs), str(row.spill_stores),
                      str(row.tensor_core_ops), fit))
    return _format(lines)


def _format(lines: list[tuple]) -> str:
    """Rows of strings as left-aligned columns."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def device_table(device: str = "cuda") -> str:
    """Launch every case of this GPU's architecture once on small inputs and tabulate what the
    driver reports (shared memory, registers, spills) next to the ahead-of-time figures."""
    arch, _ = gpu_arch.device_arch(torch.device(device))
    measure(os.cpu_count() or 1, (arch.name,))  # compile in parallel: the launches below hit Triton's cache
    lines = [("kernel", "dtype", "C", "mode", "config", "arch", "shared B", "device shared B", "regs",
              "device regs", "spill B", "device spills")]
    for case in cases((arch.name,)):
        launch = _launch(case, arch)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in launch.args)
        compiled = launch.kernel[launch.grid](*args, **launch.kwargs)
        torch.cuda.synchronize(device)
        shared, regs, stores, _, _ = compile_usage(launch.kernel, args, launch.kwargs, arch.capability)
        lines.append((case.kernel, case.dtype, case.channels, case.mode, case.config, case.arch, str(shared),
                      str(compiled.metadata.shared), str(regs), str(compiled.n_regs), str(stores),
                      str(compiled.n_spills)))
    return _format(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--json", action="store_true", help="rows as JSON (for measure())")
    parser.add_argument("--archs", nargs="+", help="only these architectures (e.g. sm_80)")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--device", help="launch on this CUDA device instead and show what it reports")
    args = parser.parse_args(argv)
    if args.device:
        print(device_table(args.device))
        return 0
    rows = measure(args.jobs, tuple(args.archs) if args.archs else None, tuple(args.kernels))
    if args.json:
        print(json.dumps([{**r._asdict(), "case": {**r.case._asdict(), "build": None}} for r in rows]))
        return 0
    print(table(rows))
    found = problems(rows)
    print("\n".join(["", *found]) if found else f"\nall {len(rows)} launches fit their budgets")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
