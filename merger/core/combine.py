"""Combine several adapters' full delta matrices into one (pure).

Every method works on the full dW_i = s_i * B_i @ A_i of each adapter, so the result is exact: no
factor-space cross terms (PEFT's `add_weighted_adapter` concatenates/averages A and B separately,
which is exact only for one adapter).

  linear       sum_i w_i dW_i
  ties         trim each dW_i to its top `density` share by magnitude, elect a sign per entry, then
               the mean of the weighted entries that agree with it (disjoint mean)
  dare_linear  drop entries of each dW_i at random (keep prob. `density`), rescale by 1/density, sum
  dare_ties    DARE's random drop and rescale, then TIES' sign election and disjoint mean

TIES sign election: the sign of the summed *unweighted* trimmed deltas ("total" mass), as in the
TIES paper and `peft.utils.merge_utils.ties(majority_sign_method="total")`. Weighting before the
election would let a large `--weights` entry outvote agreement by magnitude twice over; electing on
the raw deltas and weighting afterwards keeps the two knobs separate and matches what PEFT users get.

DARE randomness: one generator per tensor, seeded from (`seed`, tensor name), so a merge is
reproducible whatever the order or threading in which tensors are processed.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `switchyard merge` checks --combine before it needs torch
    import torch

METHODS = ("sequential", "linear", "ties", "dare_linear", "dare_ties")


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    import torch

    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    if k >= delta.numel():
        return delta
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k=k, largest=True).indices] = True
    return (flat * keep).reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    import torch

    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return delta * keep.to(delta.device) / density


def tensor_generator(seed: int, name: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def elect_and_merge(trimmed: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    import torch

    stacked = torch.stack(trimmed)  # (n, *shape)
    elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == elected
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    total = (stacked * w * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def combine(method: str, deltas: list[torch.Tensor], weights: list[float], density: float,
            seed: int, name: str) -> torch.Tensor:
    """One combined delta from per-adapter deltas (same shape, same dtype); see module docstring."""
    if method == "linear":
        return sum(w * d for w, d in zip(weights, deltas))
    if method == "ties":
        return elect_and_merge([magnitude_trim(d, density) for d in deltas], weights)
    gen = tensor_generator(seed, name)
    dropped = [random_drop(d, density, gen) for d in deltas]
    if method == "dare_linear":
        return sum(w * d for w, d in zip(weights, dropped))
    if method == "dare_ties":
        return elect_and_merge(dropped, weights)
    raise ValueError(f"unknown combine method {method!r}")
