"""Rounding loss of one merged tensor (pure data, shared by the torch and the torch-free merge)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TensorStats:
    """Rounding loss of one merged tensor.

    vanished: delta entries (nonzero in the compute dtype) that the output dtype rounds away, i.e.
      the output equals the rounded base there. rel_error: ||round(W+dW) - (W+dW)|| / ||W+dW||.
    delta_rel_error: ||(round(W+dW) - round(W)) - dW|| / ||dW||, how much of the delta survives.
    nf4_ratio: ||W - dequant(quant(W))|| / ||dW|| with --qlora-base nf4.
    """

    name: str
    numel: int
    delta_nonzero: int
    vanished: int
    rel_error: float
    delta_rel_error: float
    nf4_ratio: Optional[float] = None


def plain_lora_stats(name: str, numel: int, nonzero: int, same: int, w2: float, err2: float, realised2: float,
                     dnorm: float) -> TensorStats:
    """A single-LoRA tensor's stats from its chunk loop's totals: `same` outputs equal to the rounded
    base, sums of squares of W+dW (`w2`), of the rounding error (`err2`) and of realised-minus-intended
    delta (`realised2`), and ||dW|| (`dnorm`). Entries with a zero delta always round like the base,
    so they are all among the equal ones."""
    vanished = max(0, same - (numel - nonzero))
    wnorm, err, realised = math.sqrt(w2), math.sqrt(err2), math.sqrt(realised2)
    return TensorStats(name, numel, nonzero, vanished, err / wnorm if wnorm else 0.0,
                       realised / dnorm if dnorm else 0.0)
