"""``dsclora train``: DSCLoRA fine-tuning of a SPAN from a configuration file."""
HELP = "fine-tune a SPAN with DSCLoRA (ConvLoRA + distillation) from a TOML/YAML config"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="TOML (or YAML) training configuration")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override configuration keys, e.g. stages.0.iterations=100 data.workers=0")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last checkpoint (starts fresh if there is none)")


def run(args) -> int:
    import logging
    import sys

    from dsclora.train import ConfigError, TrainingError, TrainingInterrupted, load_config, train
    from dsclora.train.checkpoint import CheckpointStateError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        result = train(config, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"dsclora train: {exc}", file=sys.stderr)
        return 130  # the shell's code for a run ended by Ctrl+C
    except CheckpointStateError as exc:
        print(f"dsclora train: error: cannot resume: {exc} (move the run folder's checkpoints/ away "
              "to start from the beginning)", file=sys.stderr)
        return 2
    except (ConfigError, TrainingError) as exc:
        print(f"dsclora train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    print(f"trained {result.iterations} iterations ({result.skipped_steps} non-finite steps skipped); "
          f"run folder: {result.run_dir}")
    for path in result.exported.values():
        print(f"  exported {path}")
    return 0
