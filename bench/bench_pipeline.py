"""Benchmark the ``dsclora infer`` file pipeline against the network alone, in one run.

Prints, all measured in this run (interleaved rounds; the machine may be shared, so read the
ratios, which are taken round by round, rather than the absolute times):

1. PNG zlib level size/speed on upscaled 1080p outputs, ours and Pillow's (the --png-level
   default comes from it);
2. encoding threads: 1 vs N threads writing the same outputs (do the encoders release the GIL?);
3. folder target: 8 PNGs 480x270 -> 1920x1080 through ``upscale_files`` (decode, network,
   encode) vs the network alone on the decoded tensors: ratio <= 1.3x; plus the ``dsclora
   infer`` command's wall time in a fresh process (interpreter, torch import, model load);
4. memory target: peak resident memory of ``dsclora infer`` on one 1920x1080 PNG -> 7680x4320
   in a fresh process: <= 1.5 GB;
5. the memory model of ``--tile auto`` (``tiling.network_bytes``) against the measured growth of
   the peak resident memory of one untiled forward, fresh process per size;
6. video: frames/s of ``upscale_video`` on a 960x540 H.264 clip -> 3840x2160 (default codec,
   libx264 CRF 18) next to the network alone on the same frames (needs PyAV).

    python bench/bench_pipeline.py [--weights W] [--rounds 3] [--threads 2]
    python bench/bench_pipeline.py --device cuda --images 64 --threads 16 --skip memory   # GPU target
"""
import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsclora import timing
from dsclora.data.io import PILLOW_PNG_FROM_LEVEL, load_image, save_samples
from dsclora.infer import load
from dsclora.infer.encode import EncodeOptions, quantize
from dsclora.infer.pipeline import default_batch, upscale_batch, upscale_files
from dsclora.infer.tiling import network_bytes

SHARED = Path(os.environ.get("DSCLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = SHARED / "weights" / "dscf_x4_team23.pth"
SOURCES = SHARED / "data" / "Urban100_10"


def make_inputs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` natural PNGs of ``size`` (w, h): Urban100 images resized (bicubic)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(SOURCES.glob("*.png"))
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        with Image.open(names[i % len(names)]) as im:
            im.convert("RGB").resize(size, Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def png_levels(outputs: list[np.ndarray], folder: Path, rounds: int) -> None:
    """Size and encode time of each zlib level on the same upscaled outputs: ``save_samples`` (what
    ``dsclora infer`` writes with: ``png.encode_png`` below PILLOW_PNG_FROM_LEVEL, Pillow from it)
    next to Pillow alone, interleaved."""
    path = folder / "level.png"

    def ours(samples: np.ndarray, level: int) -> int:
        save_samples(path, samples, level)
        return path.stat().st_size

    def pillow(samples: np.ndarray, level: int) -> int:
        buffer = io.BytesIO()
        Image.fromarray(samples).save(buffer, format="PNG", compress_level=level)
        return buffer.tell()

    encoders = {"dsclora": ours, "Pillow": pillow}
    print(f"\nPNG level   MB/image dsclora / Pillow   s/image dsclora / Pillow   speed-up   (1080p outputs, one "
          f"thread; dsclora: encode_png below level {PILLOW_PNG_FROM_LEVEL}, Pillow from it)")
    for level in (0, 1, 2, 3, 4, 6, 9):
        sizes, times = {name: [] for name in encoders}, {name: [] for name in encoders}
        for _ in range(rounds):
            for samples in outputs:
                for name, encode in encoders.items():
                    size = []
                    times[name].append(timing.call_seconds(lambda: size.append(encode(samples, level))))
                    sizes[name].append(size[0])
        mb = {name: statistics.mean(v) / 1e6 for name, v in sizes.items()}
        sec = {name: statistics.median(v) for name, v in times.items()}
        print(f"{level:>9}   {mb['dsclora']:8.2f} / {mb['Pillow']:<8.2f}   {sec['dsclora']:7.3f} / {sec['Pillow']:<7.3f}"
              f"     {sec['Pillow'] / sec['dsclora']:5.2f}x")


def encode_threads(outputs: list[np.ndarray], folder: Path, threads: int, rounds: int) -> None:
    """Wall time to write every output with 1 thread and with ``threads`` threads, interleaved."""
    level = EncodeOptions().png_level

    def encode_all(n: int) -> None:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda i: save_samples(folder / f"t{i}.png", outputs[i], level), range(len(outputs))))

    walls = timing.medians(timing.interleaved({1: lambda: encode_all(1), threads: lambda: encode_all(threads)},
                                              warmup=0, repeats=rounds))
    one, many = walls[1], walls[threads]
    print(f"\nencode {len(outputs)} outputs at level {level}: 1 thread {one:.2f} s, {threads} threads "
          f"{many:.2f} s -> {one / many:.2f}x")


def folder_target(upscaler, inputs: list[Path], out: Path, rounds: int) -> list[np.ndarray]:
    """Pipeline vs network-only, interleaved; returns the last network outputs as samples."""
    decoded = [torch.from_numpy(load_image(p).rgb.transpose(2, 0, 1).copy())[None] for p in inputs]
    if upscaler.device.type == "cuda":  # the network alone, in the pipeline's batches
        decoded = list(torch.cat(decoded).split(default_batch(upscaler.device)))
    pairs = [(p, out / p.name) for p in inputs]
    outputs = []

    def network_only() -> None:
        outputs[:] = [quantize(y) for x in decoded for y in upscale_batch(upscaler, x)]

    def pipeline_run() -> None:
        failures = upscale_files(upscaler, pairs, progress=False)
        assert not failures, failures

    times = timing.interleaved({"network": network_only, "pipeline": pipeline_run}, upscaler.device.type,
                               warmup=0, repeats=rounds)
    network, pipeline = times["network"], times["pipeline"]
    ratios = [p / n for p, n in zip(pipeline, network)]
    print(f"\nfolder: {len(inputs)} PNGs 480x270 -> 1920x1080 (png level {EncodeOptions().png_level})")
    print(f"  network only (incl. float->uint8) {statistics.median(network):6.2f} s")
    print(f"  upscale_files pipeline            {statistics.median(pipeline):6.2f} s "
          f"({len(inputs) / statistics.median(pipeline):.1f} images/s)")
    print(f"  ratio pipeline / network, median of {rounds} interleaved rounds: "
          f"{statistics.median(ratios):.2f}x (target <= 1.3x), rounds: {', '.join(f'{r:.2f}' for r in ratios)}")
    return outputs


def cli_run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of ``dsclora`` ``args`` in a fresh process."""
    code = ("import resource, sys; from dsclora.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    done = None

    def run() -> None:
        nonlocal done
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)

    wall = timing.call_seconds(run)
    if done.returncode:
        sys.exit(f"dsclora {' '.join(args)} failed:\n{done.stderr}")
    return wall, int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads and encoders")
    parser.add_argument("--skip", nargs="*", default=[], choices=["levels", "threads", "folder", "memory", "model", "video"])
    parser.add_argument("--video-frames", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=8, help="480x270 images in the folder target")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    upscaler = load(args.weights, device=args.device)
    upscaler(torch.rand(1, 3, 16, 16))  # warm-up: the first call of the fused op imports a lot
    print(f"dsclora infer pipeline, {args.device}, CPU {args.threads} threads, torch {torch.__version__}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = make_inputs(tmp / "in", args.images, (480, 270))
        (tmp / "out").mkdir()
        outputs = None
        if "folder" not in args.skip:
            outputs = folder_target(upscaler, inputs, tmp / "out", args.rounds)
            wall, _ = cli_run(["infer", str(tmp / "in"), "-o", str(tmp / "cli"), "--weights", args.weights])
            print(f"  `dsclora infer` in a fresh process (startup + model load included): {wall:.2f} s")
        if outputs is None:
            outputs = [quantize(upscale_batch(upscaler, torch.rand(1, 3, 270, 480))[0])]
        if "levels" not in args.skip:
            png_levels(outputs, tmp, 1)
        if "threads" not in args.skip:
            encode_threads(outputs, tmp / "out", args.threads, args.rounds)
        if "memory" not in args.skip:
            big = make_inputs(tmp / "big", 1, (1920, 1080))[0]
            base = cli_run(["info"])[1]
            wall, peak = cli_run(["infer", str(big), "-o", str(tmp / "big_out"), "--weights", args.weights])
            print(f"\nmemory: 1920x1080 -> 7680x4320 PNG, fresh process: peak resident {peak:.0f} MB "
                  f"(target <= 1536 MB; `dsclora info` alone: {base:.0f} MB), wall {wall:.1f} s")
        if "model" not in args.skip:
            memory_model(args.weights)
        if "video" not in args.skip:
            video_throughput(upscaler, tmp, args.video_frames)


def memory_model(weights: str) -> None:
    """Predicted (network_bytes) vs measured peak RSS growth of one untiled CPU forward."""
    code = ("import resource, sys, torch; from dsclora.infer import load; "
            "up = load(sys.argv[1], device='cpu'); up(torch.rand(1, 3, 16, 16)); "
            "x = torch.rand(1, 3, int(sys.argv[2]), int(sys.argv[2])); "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; up(x); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, up.merged.conv_1[0].shape[0], up.scale)")
    print("\nmemory model, fp32 CPU, one untiled forward:  side  predicted MB  measured MB")
    for side in (256, 512, 768):
        done = subprocess.run([sys.executable, "-c", code, weights, str(side)], capture_output=True, text=True)
        grown_kb, features, scale = map(int, done.stdout.split())
        predicted = network_bytes(side * side, features, scale, 4) / 2**20
        print(f"{'':>48}{side:>6}  {predicted:12.0f}  {grown_kb / 1024:11.0f}")


def video_throughput(upscaler, tmp: Path, frames: int) -> None:
    """upscale_video on a 540p H.264 clip vs the network alone on its decoded frames."""
    import av

    from dsclora.infer.video import frames_to_tensor, upscale_video

    clip = tmp / "clip540.mp4"
    sources = make_inputs(tmp / "frames540", frames, (960, 540))
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 960, 540, "yuv420p"
        for path in sources:
            with Image.open(path) as im:
                out.mux(stream.encode(av.VideoFrame.from_image(im.convert("RGB")).reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    with av.open(str(clip)) as c:
        decoded = list(c.decode(video=0))
    device = upscaler.device.type
    network = timing.call_seconds(
        lambda: [quantize(upscale_batch(upscaler, frames_to_tensor([f], False))[0]) for f in decoded], device)
    whole = timing.call_seconds(lambda: upscale_video(upscaler, clip, tmp / "clip2160.mp4", progress=False), device)
    print(f"\nvideo: {frames} frames 960x540 H.264 -> 3840x2160 libx264 CRF 18: upscale_video "
          f"{frames / whole:.3f} frames/s, network alone {frames / network:.3f} frames/s "
          f"(ratio {whole / network:.2f}x)")


if __name__ == "__main__":
    main()
