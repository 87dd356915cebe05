"""Argument types for the command lines: numbers refused by the parser, naming the option."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["number_arg"]


def number_arg(kind: type[float] | type[int], minimum: float, *, above: bool = False,
               maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number of ``kind`` at least (or above) ``minimum``, at most ``maximum``.

    argparse puts the option's name before the message ("argument --port: ...").
    """
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        # nan compares false with everything, so it would pass the range checks below.
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(
                f"{text!r}: must be {'above' if above else 'at least'} {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at most {maximum}")
        return value
    return parse
