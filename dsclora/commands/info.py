"""``dsclora info``: versions, devices, and which fast paths are available (or why not)."""
HELP = "show versions, devices and which fused kernels are available (and why not)"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from dsclora.info import report

    print(report())
    return 0
