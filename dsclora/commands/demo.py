"""``dsclora demo``: the whole DSCLoRA pipeline on built-in sample data in a few CPU minutes."""
HELP = "run the whole DSCLoRA pipeline (pretrain, fine-tune, merge, evaluate) on built-in sample data"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="dsclora_demo", help="output folder (default ./dsclora_demo)")
    parser.add_argument("--base", help="SPAN checkpoint to fine-tune (default: pretrain a small one)")
    parser.add_argument("--teacher", help="SPAN teacher checkpoint (default: pretrain a wider one)")
    parser.add_argument("--data", action="append", help="folder of HR images, repeatable; a few are held out for "
                        "validation and the table (default: built-in procedural sample images)")
    parser.add_argument("--benchmark", action="append", default=[], metavar="HR_DIR",
                        help="benchmark folder of HR images to evaluate at the end (bicubic LR), repeatable")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import logging
    import sys
    from pathlib import Path

    from dsclora.demo import DemoSettings, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.base is None) != (args.teacher is None):
        print("dsclora demo: error: give both --base and --teacher, or neither", file=sys.stderr)
        return 2
    settings = DemoSettings(out=Path(args.out), base=args.base, teacher=args.teacher, data=args.data,
                            benchmarks=args.benchmark, device=args.device, seed=args.seed)
    if args.base is not None:
        from dsclora.models import load_model

        settings.scale = load_model(args.base).upscale
    run_demo(settings)
    return 0
