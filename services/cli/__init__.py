"""The `scoremesh` command line: `main` parses, the submodules hold the commands."""

from services.cli.main import main

__all__ = ["main"]
