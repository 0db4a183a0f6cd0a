"""An exponentially weighted least-squares line, ``y = intercept + slope x``, fitted one point at a time.

Two measurements are such lines: the engine's prefill time in a step's prompt tokens (its slope is the prefill speed a
heartbeat reports, ``node.inference._prefill_fit``) and, on the client, a node's decode step time in its batch
(``node.client._policy.StepFit``). One fit keeps their moments, weights and identifiability rule the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class LineFit:
    """Running weighted means of x, y, x² and xy; each new point weighs ``alpha`` once ``1 / alpha`` were seen
    (before that, all weigh the same: their plain mean)."""

    alpha: float
    """Weight of each new point in the long run."""
    min_points: int
    """Points before the line is identified."""
    min_variance: float
    """Variance of x below which the slope is not identified (every point at about one x)."""
    points: int = 0
    mean_x: float = 0.0
    mean_y: float = 0.0
    mean_x2: float = 0.0
    mean_xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        """One more point."""
        self.points += 1
        w = max(self.alpha, 1.0 / self.points)
        self.mean_x += w * (x - self.mean_x)
        self.mean_y += w * (y - self.mean_y)
        self.mean_x2 += w * (x * x - self.mean_x2)
        self.mean_xy += w * (x * y - self.mean_xy)

    def slope(self) -> float | None:
        """The slope, clipped at 0 (neither line falls); None until identified."""
        if self.points < self.min_points:
            return None
        variance = self.mean_x2 - self.mean_x**2
        if variance < self.min_variance:
            return None
        return max(0.0, (self.mean_xy - self.mean_x * self.mean_y) / variance)
