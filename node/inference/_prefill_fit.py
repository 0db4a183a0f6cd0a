"""The engine's prefill speed as heartbeats report it: the slope of a step's prefill time in its tokens.

A step's prefill forwards cost a fixed part (weights read, kernel launches) plus a part per prompt token. Their plain
time over tokens mixes the two, so a node that has computed only short prompts reported a per-token time 70 times
a node computing long ones (measured on the quick model: 2.8 ms against 0.04 ms), and a client pricing prompts by it
sent everything to the node busy with long documents. The slope of the line fitted over recent steps is the cost of
one more prompt token, which is what a client multiplies by the tokens ahead of its request; the fixed part is what
its one-step term and its measured correction stand for.
"""

from __future__ import annotations

from dataclasses import dataclass

from node._line_fit import LineFit


@dataclass(slots=True, kw_only=True)
class PrefillFit(LineFit):
    """Exponentially weighted least squares of a step's prefill time (y, seconds) against its prefill tokens (x)."""

    alpha: float = 0.1
    """Weight of each new step once ``1 / alpha`` were seen (before that, their plain mean)."""
    min_points: int = 4
    """Steps before the slope is reported."""
    min_variance: float = 32.0**2
    """Variance of the steps' token counts (a standard deviation of 32 tokens) below which the slope is not
    identified, tokens squared."""

    def slope(self) -> float:
        """Seconds per further prompt token, > 0; 0 until identified (too few steps, or all of about one size)."""
        return LineFit.slope(self) or 0.0
