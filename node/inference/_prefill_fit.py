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


@dataclass(slots=True, kw_only=True)
class PrefillFit:
    """Exponentially weighted least squares of a step's prefill time against its prefill tokens."""

    alpha: float = 0.1
    """Weight of each new step once ``1 / alpha`` were seen (before that, their plain mean)."""
    min_steps: int = 4
    """Steps before the slope is reported."""
    min_spread_tokens: float = 32.0
    """Standard deviation of the steps' token counts below which the slope is not identified, tokens."""
    steps: int = 0
    mean_tokens: float = 0.0
    mean_s: float = 0.0
    mean_tokens2: float = 0.0
    mean_cross: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        """One step computed ``tokens`` prompt tokens in ``seconds``."""
        self.steps += 1
        w = max(self.alpha, 1.0 / self.steps)
        self.mean_tokens += w * (tokens - self.mean_tokens)
        self.mean_s += w * (seconds - self.mean_s)
        self.mean_tokens2 += w * (tokens * tokens - self.mean_tokens2)
        self.mean_cross += w * (tokens * seconds - self.mean_cross)

    def slope(self) -> float:
        """Seconds per further prompt token, > 0; 0 until identified (too few steps, or all of about one size)."""
        if self.steps < self.min_steps:
            return 0.0
        variance = self.mean_tokens2 - self.mean_tokens**2
        if variance < self.min_spread_tokens**2:
            return 0.0
        return max(0.0, (self.mean_cross - self.mean_tokens * self.mean_s) / variance)
