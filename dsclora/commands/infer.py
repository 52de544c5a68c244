"""``dsclora infer``: upscale image and video files with the fused merged-weight network."""
HELP = "upscale images (files, folders, globs) and videos with a SPAN on fused kernels (default: DSCF x4)"

PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def add_arguments(parser) -> None:
    from dsclora.infer.encode import DEFAULT_PNG_LEVEL

    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, folders or glob patterns; video files (.mp4 .mkv .mov .webm .avi)")
    parser.add_argument("-i", "--input", dest="more_inputs", action="append", default=[], metavar="INPUT",
                        help="one more input (may be repeated), as the positional inputs")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created if needed)")
    parser.add_argument("--weights", metavar="W",
                        help="checkpoint (.pth or .safetensors); default: the released DSCF x4 weights, "
                             "downloaded once into ~/.cache/dsclora (or $DSCLORA_CACHE)")
    parser.add_argument("--scale", type=float,
                        help="output scale; when it differs from the model's, the network output "
                             "is resized to it (bicubic, antialiased)")
    parser.add_argument("--tile", type=_tile, default="auto", metavar="N|auto",
                        help="run in NxN-pixel tiles of the input (0: whole images; default auto: "
                             "the largest tile a memory model fits in the GPU's free memory or a "
                             "512 MB CPU budget; on GPU out-of-memory the tile is halved)")
    parser.add_argument("--tile-pad", type=int, metavar="P",
                        help="context around each tile in input pixels (>= 21, SPAN's receptive "
                             "radius, gives exactly the untiled output; default: a few pixels more)")
    group = parser.add_mutually_exclusive_group()
    for flag, name in PRECISIONS.items():
        group.add_argument(f"--{flag}", dest="precision", action="store_const", const=flag,
                           help=f"compute in {name} (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--suffix", default="", help="appended to each output file's stem")
    parser.add_argument("--ext", help="output format, e.g. png, jpg, webp (default: the input's)")
    parser.add_argument("--png-level", type=int, choices=range(10), metavar="0-9",
                        help=f"zlib level of PNG outputs (default: {DEFAULT_PNG_LEVEL}, chosen from the "
                             "size/speed table in bench/RESULTS.md; 9: smallest, slowest)")
    parser.add_argument("--quality", type=int, choices=range(1, 101), metavar="1-100",
                        help="JPEG/WebP quality (default: Pillow's, 75)")
    parser.add_argument("--batch", type=int, metavar="B",
                        help="same-size images or video frames per network call (default: 8 on CUDA, 1 on CPU)")
    video = parser.add_argument_group("video (needs PyAV: pip install \"dsclora[video]\")")
    video.add_argument("--codec", help="video encoder (default: libx264 when this FFmpeg has it, else mpeg4)")
    video.add_argument("--crf", type=int, help="constant rate factor of x264/x265/VP9/AV1 (default 18)")
    video.add_argument("--pix-fmt", help="output pixel format (default: the source's when the encoder takes it)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from dsclora.infer.batch import expand_inputs, output_paths
    from dsclora.infer.pipeline import upscale_files
    from dsclora.infer.video import is_video

    if (args.tile_pad is not None and args.tile_pad < 0) or (args.batch is not None and args.batch < 1):
        print("dsclora infer: --tile-pad must be >= 0, --batch >= 1", file=sys.stderr)
        return 2
    inputs = args.inputs + args.more_inputs
    if not inputs:
        print("dsclora infer: no input given (positional INPUT or -i/--input)", file=sys.stderr)
        return 2
    files, missing = expand_inputs(inputs)
    try:
        images = output_paths([f for f in files if not is_video(f)], args.output, args.suffix, args.ext)
        videos = output_paths([f for f in files if is_video(f)], args.output, args.suffix)
        Path(args.output).mkdir(parents=True, exist_ok=True)  # before any work
    except ValueError as exc:
        print(f"dsclora infer: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dsclora infer: cannot create the output folder {args.output}: {exc}", file=sys.stderr)
        return 2
    if not images and not videos:
        for name, reason in missing.items():
            print(f"dsclora infer: {name}: {reason}", file=sys.stderr)
        return 1
    try:
        upscaler = _load_upscaler(args)
    except ValueError as exc:
        print(f"dsclora infer: {exc}", file=sys.stderr)
        return 2
    failures = dict(missing)
    failures.update(upscale_files(upscaler, images, args.scale, encode_options(args), batch=args.batch))
    failures.update(_upscale_videos(upscaler, videos, args))
    total = len(images) + len(videos) + len(missing)
    print(f"dsclora infer: {total - len(failures)} of {total} inputs upscaled into {args.output}",
          file=sys.stderr)
    for name, reason in failures.items():
        print(f"  FAILED {name}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def _load_upscaler(args):
    """The Upscaler of --weights, --device, the precision and tile flags; ValueError if it cannot load."""
    import torch

    from dsclora.infer import DownloadError, load
    from dsclora.models import CheckpointError

    dtype = getattr(torch, PRECISIONS[args.precision]) if args.precision else None
    try:
        upscaler = load(args.weights, device=args.device, dtype=dtype)
    except (DownloadError, CheckpointError, RuntimeError) as exc:
        raise ValueError(str(exc)) from exc
    upscaler.tile = args.tile
    if args.tile_pad is not None:
        upscaler.tile_pad = args.tile_pad
    return upscaler


def _upscale_videos(upscaler, pairs, args) -> dict[str, str]:
    """Upscale each (video, target); {video: error} for those that failed (the others go on)."""
    import sys

    from dsclora.infer.pipeline import default_batch, describe
    from dsclora.infer.video import VideoError, VideoOptions, upscale_video

    failures = {}
    options = VideoOptions(args.codec, args.crf, args.pix_fmt)
    for src, dst in pairs:
        try:
            upscale_video(upscaler, src, dst, options, args.batch or default_batch(upscaler.device), args.scale)
        except (VideoError, OSError) as exc:
            failures[str(src)] = describe(src, exc)
            print(f"dsclora infer: FAILED {src}: {failures[str(src)]}", file=sys.stderr)
    return failures


def _tile(text: str):
    """--tile's value: "auto", or a size >= 0 (0: None, whole images)."""
    import argparse

    if text == "auto":
        return "auto"
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a tile size >= 0 or 'auto', got {text!r}")
    return int(text) or None


def encode_options(args):
    """The EncodeOptions of --png-level and --quality (unset: the defaults)."""
    from dsclora.infer.encode import EncodeOptions

    given = {"png_level": args.png_level, "quality": args.quality}
    return EncodeOptions(**{k: v for k, v in given.items() if v is not None})
