"""The ``pilotflow`` command line: argparse, the subcommands, and the views (rich).
The only part of the package that prints."""

from pilotflow.cli.main import main, own_stdout

__all__ = ["main", "own_stdout"]
