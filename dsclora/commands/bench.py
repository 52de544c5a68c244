"""``dsclora bench``: runtime per image and peak memory, eager vs fused (NTIRE conventions)."""
from . import UsageError

HELP = "time a model per image (eager vs fused; fp32/fp16 on GPU, fp32 on CPU) in NTIRE conventions"


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint (.pth or .safetensors)")
    parser.add_argument("--input", help="folder of LR images (default: synthetic DIV2K-size inputs)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="synthetic input height and width (default 339 510)")
    parser.add_argument("--images", type=int, default=1, help="number of synthetic inputs (default 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per image (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per image; the median counts (default 10)")
    parser.add_argument("--device", choices=("all", "cuda", "cpu"), default="all",
                        help="which devices to measure (default: CUDA if available, and CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import dataclasses
    import json
    import sys

    import torch

    from dsclora.benchmark import DIV2K_LR_X4, benchmark, default_configs, folder_inputs, format_table, synthetic_inputs
    from dsclora.models import load_model
    from dsclora.summary import summarize

    if args.input and args.size:
        raise UsageError("give --input or --size, not both")
    configs = [c for c in default_configs() if args.device in ("all", c[0])]
    if not configs:
        print("dsclora bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 1
    model = load_model(args.weights)
    if args.input:
        inputs = folder_inputs(args.input)
    else:
        inputs = synthetic_inputs(tuple(args.size or DIV2K_LR_X4), args.images, model.in_channels)
    results = benchmark(model, inputs, configs, args.warmup, args.repeats)
    summary = summarize(model)
    if args.json:
        print(json.dumps({
            "weights": args.weights, "inputs": [list(x.shape) for x in inputs],
            "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "summary": summary.as_dict(),
            "results": [dataclasses.asdict(r) for r in results],
        }))
        return 0
    shapes = sorted({"x".join(map(str, x.shape)) for x in inputs})
    print(f"{args.weights}: SPAN C={model.feature_channels} Cc={model.cat_channels} x{model.upscale}; "
          f"{summary.params / 1e6:.3f} M params, {summary.flops / 1e9:.2f} G FLOPs at 256x256")
    print(f"{len(inputs)} image(s) {', '.join(shapes)}; warm-up {args.warmup}, median of {args.repeats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(format_table(results))
    return 0
