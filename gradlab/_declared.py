"""What ``gradlab.symbols`` declares, as plain data (private; ``gradlab.symbols`` exports it): the
legal range of a variable or hyperparameter, and the names of the extra canonical variables.

It lives apart from the symbols so that code which only checks numbers against ranges or reads
variable names (a run: the policies, and validation served from the shipped tables) does not
import sympy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Domain", "EXTRA_NAMES"]

# LD-DPO's extra variables (``gradlab.symbols.EXTRA`` declares their symbols, in this order)
EXTRA_NAMES = ("tail_w", "tail_l", "ref_tail_w", "ref_tail_l")


@dataclass(frozen=True)
class Domain:
    """A real interval; ``contains`` is what ``gradlab eval`` checks user input against."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = True
    high_open: bool = True

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        lo = "-inf" if self.low == -math.inf else f"{self.low:g}"
        hi = "inf" if self.high == math.inf else f"{self.high:g}"
        return f"{left}{lo}, {hi}{right}"
