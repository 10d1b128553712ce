"""Weights that move with training progress ``s / total_steps`` in [0, 1].

They are pure functions of progress, so a resumed run that restores its step continues the same
curve exactly.
"""
from __future__ import annotations

import math

SHAPES = ("linear", "cosine", "step")


def transition(progress: float, start: float = 0.0, end: float = 0.5, point: float = 0.5,
               shape: str = "linear") -> float:
    """GRKD's lambda(s): rises from ``start`` to ``end`` while progress goes 0 -> ``point``, then holds.

    ``shape``: ``linear``, ``cosine`` (half-cosine ease) or ``step`` (jumps at ``point``).
    """
    if shape not in SHAPES:
        raise ValueError(f"transition shape {shape!r} is not one of {', '.join(SHAPES)}")
    if not 0.0 <= point <= 1.0:
        raise ValueError(f"transition point {point} must lie in [0, 1]")
    for name, value in (("lambda_start", start), ("lambda_end", end)):
        if not 0.0 <= value <= 1.0:     # a mixing weight: outside [0, 1] a term's sign flips
            raise ValueError(f"{name}={value} must lie in [0, 1]")
    s = min(max(float(progress), 0.0), 1.0)
    if shape == "step":
        frac = 1.0 if s >= point else 0.0
    else:
        frac = 1.0 if point == 0.0 else min(s / point, 1.0)
        if shape == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return start + (end - start) * frac
