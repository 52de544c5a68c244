"""Subcommands of the ``dsclora`` CLI, one module each (see ``dsclora.cli``)."""


class UsageError(Exception):
    """A command's arguments do not fit together: ``dsclora.cli.main`` prints it and exits 2."""
