"""Rounding loss of one merged tensor (pure data, shared by the torch and the torch-free merge)."""

from __future__ import annotations

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
