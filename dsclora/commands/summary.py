"""``dsclora summary``: params, FLOPs, activations and convs (NTIRE conventions)."""
from . import UsageError

HELP = "print a model's params, FLOPs, activations and conv count (NTIRE efficient-SR conventions)"


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint (.pth or .safetensors)")
    parser.add_argument("--size", type=int, nargs="+", default=[256], metavar="N",
                        help="input height and width: one number (square) or two (default 256)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import json

    from dsclora.models import load_model
    from dsclora.summary import summarize

    if len(args.size) > 2:
        raise UsageError("--size takes one or two numbers")
    model = load_model(args.weights)
    summary = summarize(model, tuple(args.size) if len(args.size) == 2 else args.size[0])
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        print(f"{args.weights}: SPAN C={model.feature_channels} Cc={model.cat_channels} x{model.upscale}")
        print(summary)
    return 0
