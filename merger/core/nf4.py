"""bitsandbytes' NF4 round trip (pure): the weights a QLoRA adapter was trained against.

Blockwise absmax quantization with bitsandbytes' default block size (64) over the flattened
(out, in) weight; each value maps to the nearest of the 16 NF4 code points, and dequantization is
code * absmax, rounded to the weight's own dtype (as bitsandbytes returns it). Double quantization
of the absmax statistics (`bnb_4bit_use_double_quant`) is not modelled.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 64
# bitsandbytes' NF4 code book (functional.py, `get_4bit_type("nf4")`)
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020129013062,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 of w.numel(), absmax float32 per block); the last block may be short."""
    flat = w.reshape(-1).to(torch.float32)
    pad = -flat.numel() % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    midpoints = (code[1:] + code[:-1]) / 2
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.reshape(-1)[: flat.numel()], absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype,
                   block_size: int = BLOCK_SIZE) -> torch.Tensor:
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    n = codes.numel()
    pad = -n % block_size
    values = torch.nn.functional.pad(code[codes.long()], (0, pad)).view(-1, block_size) * absmax.unsqueeze(1)
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize_nf4(w)) in w's dtype."""
    codes, absmax = quantize_nf4(w)
    return dequantize_nf4(codes, absmax, w.shape, w.dtype)
