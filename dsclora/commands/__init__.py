"""Subcommands of the ``dsclora`` CLI, one module each (see ``dsclora.cli``)."""
