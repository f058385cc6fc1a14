"""Command line of ``dpanel-tunnel``: ``dpanel-tunnel TOKEN`` or ``--config FILE``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import __version__

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpanel-tunnel")
    parser.add_argument("token", nargs="?")
    parser.add_argument("--config")
    parser.add_argument("--version", action="version", version=f"dpanel-tunnel {__version__}")
    parser.parse_args(argv)
    return 0
