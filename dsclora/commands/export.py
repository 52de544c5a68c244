"""``dsclora export``: write a checkpoint in a format other tools load."""
from . import UsageError

HELP = "export weights for other tools: official SPAN .pth/.safetensors, spandrel, ONNX (fp32/fp16)"


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint to export (.pth or .safetensors)")
    parser.add_argument(
        "--format", required=True, choices=("official", "spandrel", "onnx"),
        help="official: eval-form SPAN state dict; spandrel: training-form layout that "
             "spandrel/chaiNNer/ComfyUI detect; onnx: opset 17, dynamic batch/height/width",
    )
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .pth or .safetensors (official, spandrel), .onnx (onnx)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="ONNX weight and I/O precision (checkpoints are always fp32)")


def run(args) -> int:
    import json
    import sys

    import torch

    from dsclora.export import export
    from dsclora.models import load_model, read_state_dict

    if args.dtype == "fp16" and args.format != "onnx":
        raise UsageError("--dtype fp16 applies to --format onnx only")
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    try:
        _, metadata = read_state_dict(args.weights)
        lora = json.loads(metadata["lora"]) if "lora" in metadata else None
        path = export(load_model(args.weights), args.format, args.output, dtype=dtype, lora=lora)
    except (ValueError, ImportError) as exc:  # bad checkpoint, unsupported target, missing extra
        print(f"dsclora export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.format}{', ' + args.dtype if args.format == 'onnx' else ''})")
    return 0
