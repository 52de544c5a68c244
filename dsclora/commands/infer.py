"""``dsclora infer``: upscale image files with the fused merged-weight network."""
HELP = "upscale images (files, folders, globs) with a SPAN on fused kernels (default: DSCF x4)"

PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
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
                        help="zlib level of PNG outputs (default: dsclora.infer.encode.DEFAULT_PNG_LEVEL, "
                             "chosen from the size/speed table in bench/RESULTS.md; 9: smallest, slowest)")
    parser.add_argument("--quality", type=int, choices=range(1, 101), metavar="1-100",
                        help="JPEG/WebP quality (default: Pillow's, 75)")
    parser.add_argument("--batch", type=int, metavar="B",
                        help="same-size images per network call (default: 8 on CUDA, 1 on CPU)")


def run(args) -> int:
    import sys
    from pathlib import Path

    import torch

    from dsclora.infer import DownloadError, load
    from dsclora.infer.batch import expand_inputs, output_paths
    from dsclora.infer.pipeline import upscale_files
    from dsclora.models import CheckpointError

    if (args.tile_pad is not None and args.tile_pad < 0) or (args.batch is not None and args.batch < 1):
        print("dsclora infer: --tile-pad must be >= 0, --batch >= 1", file=sys.stderr)
        return 2
    files, missing = expand_inputs(args.inputs)
    try:
        targets = output_paths(files, args.output, args.suffix, args.ext)
    except ValueError as exc:
        print(f"dsclora infer: {exc}", file=sys.stderr)
        return 2
    try:  # before any work: an output folder that cannot exist fails every file
        Path(args.output).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"dsclora infer: cannot create the output folder {args.output}: {exc}", file=sys.stderr)
        return 2
    if not targets:
        for name, reason in missing.items():
            print(f"dsclora infer: {name}: {reason}", file=sys.stderr)
        return 1
    dtype = getattr(torch, PRECISIONS[args.precision]) if args.precision else None
    try:
        upscaler = load(args.weights, device=args.device, dtype=dtype)
    except (DownloadError, CheckpointError, RuntimeError) as exc:
        print(f"dsclora infer: {exc}", file=sys.stderr)
        return 2
    upscaler.tile = args.tile
    if args.tile_pad is not None:
        upscaler.tile_pad = args.tile_pad
    failures = dict(missing)
    failures.update(upscale_files(upscaler, targets, args.scale, encode_options(args),
                                  batch=args.batch))
    done = len(targets) - (len(failures) - len(missing))
    print(f"dsclora infer: {done} of {len(targets) + len(missing)} inputs upscaled into {args.output}",
          file=sys.stderr)
    for name, reason in failures.items():
        print(f"  FAILED {name}: {reason}", file=sys.stderr)
    return 1 if failures else 0


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
