"""`labeler serve` (issue 3). Registered by labeler.cli."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: ARG001 - filled in by the service
    """Add `serve` to the `labeler` parser."""
