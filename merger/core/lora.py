"""A PEFT LoRA adapter as merge operations, and the exact math of each (pure: tensors in, tensors out).

Orientation: every delta is returned in the *storage* orientation of the base tensor it is added to
  nn.Linear   W: (out, in)   A: (r, in)   B: (out, r)        dW = s * B @ A
  Conv1D      W: (in, out)   (fan_in_fan_out)                 dW = s * (B @ A).T
  Embedding   W: (num, dim)  A: (r, num)  B: (dim, r)         dW = s * (B @ A).T
DoRA rescales rows of W + dW (columns for fan_in_fan_out, embedding dimensions for embeddings) by
magnitude / ||W0 + dW||, with the norm taken on the *unmerged* base W0, as PEFT's forward does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from merger.core.adapter_config import AdapterConfig
from merger.errors import UnsupportedAdapterError

if TYPE_CHECKING:  # the factors are torch tensors, or numpy arrays on the torch-free path (merger/core/fast.py)
    import torch

PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?|token_adapter\.trainable_tokens_delta)$")


@dataclass(frozen=True)
class LoraModule:
    path: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" or "embedding"
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    bias: Optional[torch.Tensor] = None  # lora_B.bias (lora_bias=True)
    magnitude: Optional[torch.Tensor] = None  # DoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_shape(self) -> tuple[int, int]:
        """Shape of dW in the base tensor's storage orientation."""
        if self.kind == "embedding":
            return (self.A.shape[1], self.B.shape[0])
        out_in = (self.B.shape[0], self.A.shape[1])
        return out_in[::-1] if self.fan_in_fan_out else out_in


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: rows `indices` of an embedding are replaced by `values` (len(indices), dim)."""

    indices: tuple[int, ...]
    values: torch.Tensor


@dataclass(frozen=True)
class ParsedAdapter:
    name: str
    config: AdapterConfig
    modules: dict = field(default_factory=dict)  # module path -> LoraModule
    replacements: dict = field(default_factory=dict)  # base tensor name -> full new tensor
    token_rows: dict = field(default_factory=dict)  # module path -> TokenRows

    @property
    def nbytes(self) -> int:
        ts = [t for m in self.modules.values() for t in (m.A, m.B, m.bias, m.magnitude) if t is not None]
        ts += list(self.replacements.values()) + [r.values for r in self.token_rows.values()]
        return sum(t.nbytes for t in ts)


def parse_adapter(name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> ParsedAdapter:
    """Group an adapter's saved tensors by module; unknown LoRA-looking keys raise (never dropped)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(k)
        if m:
            parts.setdefault(m["mod"], {})[m["part"].replace(".weight", "") if "magnitude" in m["part"]
                                           else m["part"]] = tensor
            continue
        if "lora_" in k or "trainable_tokens" in k:
            raise UnsupportedAdapterError(f"adapter {name}: tensor {key} is not a LoRA part switchyard knows",
                                          f"supported: {', '.join(('lora_A', 'lora_B', 'lora_embedding_A/B', 'lora_magnitude_vector', 'trainable_tokens_delta'))}")
        # a full parameter: modules_to_save or a trained bias (PEFT keeps `.base_layer` for wrapped layers)
        base_name = k.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        replacements[base_name] = tensor
    modules: dict[str, LoraModule] = {}
    token_rows: dict[str, TokenRows] = {}
    for mod, p in parts.items():
        if "token_adapter.trainable_tokens_delta" in p:
            values = p.pop("token_adapter.trainable_tokens_delta")
            idx = config.token_indices(mod)
            if idx is None or len(idx) != values.shape[0]:
                raise UnsupportedAdapterError(
                    f"adapter {name}: trainable tokens for {mod} do not match trainable_token_indices",
                    "re-save the adapter with PEFT")
            token_rows[mod] = TokenRows(tuple(int(i) for i in idx), values)
        if not p:
            continue
        kind = "embedding" if "lora_embedding_A" in p or "lora_embedding_B" in p else "linear"
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        if a_key not in p or b_key not in p:
            raise UnsupportedAdapterError(f"adapter {name}: module {mod} has only one of {a_key}/{b_key}",
                                          "the adapter file is incomplete; re-save it")
        A, B = p[a_key], p[b_key]
        if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] != B.shape[1]:
            raise UnsupportedAdapterError(
                f"adapter {name}: {mod} has LoRA factors of shapes {tuple(A.shape)} and {tuple(B.shape)}, "
                "which are not a 2-D low-rank pair (conv LoRA is not supported)", "serve it as an adapter")
        r_cfg, _ = config.rank_and_alpha(mod)
        if A.shape[0] != r_cfg:
            raise UnsupportedAdapterError(
                f"adapter {name}: {mod} has rank {A.shape[0]} but adapter_config.json says r={r_cfg}",
                "fix r/rank_pattern in adapter_config.json to match the saved weights")
        modules[mod] = LoraModule(
            path=mod, kind=kind, A=A, B=B, scaling=config.scaling(mod),
            fan_in_fan_out=config.fan_in_fan_out and kind == "linear",
            bias=p.get("lora_B.bias"), magnitude=p.get("lora_magnitude_vector"))
        if config.use_dora and modules[mod].magnitude is None:
            raise UnsupportedAdapterError(f"adapter {name}: use_dora is set but {mod} has no magnitude vector",
                                          "re-save the adapter with PEFT")
    return ParsedAdapter(name, config, modules, replacements, token_rows)


def lora_delta(mod: LoraModule, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """dW in the base tensor's storage orientation, computed in `dtype` (float32 or float64)."""
    A = mod.A.to(device=device, dtype=dtype)
    B = mod.B.to(device=device, dtype=dtype)
    d = B @ A
    if mod.kind == "embedding" or mod.fan_in_fan_out:
        d = d.T
    return d * mod.scaling


def dora_factor(mod: LoraModule, w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """magnitude / ||W0 + dW||, shaped to broadcast over W in storage orientation.

    `w0` is the unmerged base weight and `delta` the scaled dW, both in storage orientation and
    the compute dtype.
    """
    import torch

    mag = mod.magnitude.to(device=w0.device, dtype=w0.dtype)
    if mod.kind == "embedding":  # per embedding dimension: columns of (num, dim)
        return (mag / torch.linalg.norm(w0 + delta, dim=0)).view(1, -1)
    if mod.fan_in_fan_out:  # Conv1D (in, out): one norm per output column
        return (mag / torch.linalg.norm(w0 + delta, dim=0)).view(1, -1)
    return (mag / torch.linalg.norm(w0 + delta, dim=1)).view(-1, 1)


def lora_bias_delta(mod: LoraModule, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return mod.bias.to(device=device, dtype=dtype) * mod.scaling


def apply_token_rows(w: torch.Tensor, rows: TokenRows) -> torch.Tensor:
    import torch

    index = torch.tensor(rows.indices, device=w.device)
    return w.index_copy(0, index, rows.values.to(device=w.device, dtype=w.dtype))
