"""The ``dsclora`` command line: one subcommand per module of ``dsclora.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code), and keeps heavy imports inside ``run``.

Exit codes, one policy for every command: 0 success; 1 a runtime failure (a file that cannot
be read or written, a model that fails to load, a device that is missing); 2 a usage error (a
wrong or missing argument: argparse's own errors, or a command raising ``UsageError``).
"""
import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands
from .commands import UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EPILOG = "exit codes: 0 success, 1 runtime failure (unreadable input, failed write, missing device), 2 usage error"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsclora", description="DSCLoRA super-resolution toolkit", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"dsclora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"dsclora.commands.{info.name}")
        p = sub.add_parser(info.name, help=module.HELP, description=module.HELP, epilog=EPILOG)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args) or EXIT_OK)
    except UsageError as exc:
        print(f"dsclora {args.command}: {exc} (see dsclora {args.command} --help)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
