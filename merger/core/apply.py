"""Run one tensor's merge steps (pure): upcast once, add every delta in the compute dtype, round once.

Memory per call: the upcast weight, one delta and the rounded output (about 2.5x the tensor in
float32), plus the unmerged copy DoRA needs for its norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from merger.core.combine import combine
from merger.core.lora import apply_token_rows, dora_factor, lora_bias_delta, lora_delta
from merger.core.nf4 import nf4_roundtrip
from merger.core.plan import AddLora, AddLoraBias, Combine, Replace, SetRows, TensorTask
from merger.errors import NonFiniteError

ST_TO_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}


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


def run_task(task: TensorTask, base: torch.Tensor, compute: torch.dtype = torch.float32,
             device: str = "cpu") -> tuple[torch.Tensor, Optional[TensorStats]]:
    """`base` in the task's source dtype -> (output in the task's out dtype, stats or None)."""
    out_dtype = ST_TO_TORCH[task.out_dtype]
    if task.passthrough:
        return (base if base.dtype == out_dtype else base.to(out_dtype)), None
    base = base.to(device)
    w_ref = base.to(compute)  # the weight as stored, for the rounding-loss statistics
    nf4_err = None
    if task.nf4:
        q_in = base.T if task.nf4_transposed else base
        rt = nf4_roundtrip(q_in)
        rt = rt.T if task.nf4_transposed else rt
        nf4_err = torch.linalg.norm((w_ref - rt.to(compute)).reshape(-1)).item()
        w0 = rt.to(compute)
    else:
        w0 = w_ref
    w = w0.clone()
    for step in task.steps:
        if isinstance(step, Replace):
            w = step.tensor.to(device=device, dtype=compute).clone()
        elif isinstance(step, AddLora):
            d = lora_delta(step.module, compute, device)
            if step.module.magnitude is not None:
                w = dora_factor(step.module, w0, d) * (w + d)
            else:
                w += d
            del d
        elif isinstance(step, AddLoraBias):
            w += lora_bias_delta(step.module, compute, device)
        elif isinstance(step, SetRows):
            w = apply_token_rows(w, step.rows)
        elif isinstance(step, Combine):
            deltas, weights = [], []
            for mod, wt in zip(step.modules, step.weights):
                if mod is None:
                    continue
                if step.bias:
                    deltas.append(lora_bias_delta(mod, compute, device) if mod.bias is not None
                                  else torch.zeros_like(w))
                else:
                    deltas.append(lora_delta(mod, compute, device))
                weights.append(wt)
            w += combine(step.method, deltas, weights, step.density, step.seed, task.name).to(device)
            del deltas
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError(f"merged tensor {task.name} has NaN/Inf values",
                             "the adapter or base is broken (check its training run); nothing was written")
    out = w.to(out_dtype)
    stats = _stats(task, w_ref, w, out, nf4_err)
    return out.cpu(), stats


def _stats(task: TensorTask, w_ref: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
           nf4_err: Optional[float]) -> TensorStats:
    delta = w - w_ref
    nonzero = delta != 0
    ref_out = w_ref.to(out.dtype)
    vanished = int((nonzero & (out == ref_out)).sum())
    out_c = out.to(w.dtype)
    err = torch.linalg.norm((out_c - w).reshape(-1)).item()
    dnorm = torch.linalg.norm(delta.reshape(-1)).item()
    realised = torch.linalg.norm(((out_c - ref_out.to(w.dtype)) - delta).reshape(-1)).item()
    wnorm = torch.linalg.norm(w.reshape(-1)).item()
    return TensorStats(task.name, w.numel(), int(nonzero.sum()), vanished,
                       err / wnorm if wnorm else 0.0, realised / dnorm if dnorm else 0.0,
                       (nf4_err / dnorm if dnorm else float("inf")) if nf4_err is not None else None)
