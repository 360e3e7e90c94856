"""Batch labeling, evaluation and win-rate commands (issue 6). Registered by labeler.cli."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: ARG001 - filled in by the batch commands
    """Add the batch commands to the `labeler` parser."""
