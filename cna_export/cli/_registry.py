"""The command registry shared by the CLI modules."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

log = logging.getLogger("cna_export")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
PARSERS: list[Callable[[Any], None]] = []


def command(name: str) -> Callable:
    """Register ``fn`` as the handler of sub-command ``name``."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco
