"""`adapter_config.json`, parsed once into a frozen model, with everything switchyard cannot merge
exactly refused by name (never dropped silently).

Scaling follows PEFT: per module, `r` and `lora_alpha` come from `rank_pattern`/`alpha_pattern`
(PEFT's `get_pattern_key`: the first pattern that matches the end of the module path at a dot
boundary), and the scale is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from merger.errors import UnsupportedAdapterError

SUPPORTED = ("LoRA with lora_alpha/r or rsLoRA scaling, rank/alpha patterns, DoRA, fan_in_fan_out, "
             "embedding LoRA, lora_bias, trained biases, modules_to_save, trainable_token_indices")

# options whose presence changes the adapter's function in ways a plain W + dW cannot express
_UNMERGEABLE_OPTIONS = {
    "layer_replication": "layer replication (the merged model would need duplicated layers)",
    "use_qalora": "QA-LoRA (pooled inputs; merge needs the quantized base)",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after its invocation tokens",
    "arrow_config": "Arrow routing between several LoRA experts",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "mica": "MiCA",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts)",
    "megatron_config": "Megatron parallel LoRA layers",
    "ensure_weight_tying": "ensure_weight_tying (tied LoRA on embeddings and lm_head)",
}
# initialisations that rewrite the base weights, so the adapter is relative to a different W
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# fields that carry no merge semantics (or are checked elsewhere)
_INERT = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "lora_dropout",
    "peft_version", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "exclude_modules", "layers_pattern", "init_lora_weights",
}


class AdapterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    peft_type: str
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    modules_to_save: Optional[list[str]] = None
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    init_lora_weights: Any = True
    base_model_name_or_path: Optional[str] = None

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module_path), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module_path), self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, module_path: str) -> float:
        r, alpha = self.rank_and_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def token_indices(self, module_path: str) -> Optional[list[int]]:
        """Token rows replaced in the embedding at `module_path` (PEFT's trainable tokens)."""
        tti = self.trainable_token_indices
        if tti is None:
            return None
        if isinstance(tti, list):
            return tti  # a list means "the input embedding", whatever its name
        for key, idx in tti.items():
            if re.match(rf"(.*\.)?({key})$", module_path):
                return idx
        return None


def pattern_key(patterns: dict, module_path: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern matching the end of `module_path` at a dot."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return module_path


def parse_adapter_config(raw: dict, where: str) -> AdapterConfig:
    """Validate a loaded adapter_config.json; anything not mergeable exactly raises, by name."""
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where} is a {raw.get('peft_type') or 'unknown'} adapter; switchyard merges only LoRA adapters",
            f"supported: {SUPPORTED}")
    for key, what in _UNMERGEABLE_OPTIONS.items():
        if raw.get(key):
            raise UnsupportedAdapterError(f"{where} uses {what} ({key}), which cannot be merged exactly",
                                          "serve it as an adapter instead of merging it")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base weights",
            "convert it first with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)")
    try:
        config = AdapterConfig.model_validate(raw)
    except Exception as exc:  # pydantic's message names the field
        raise UnsupportedAdapterError(f"{where}: adapter_config.json does not parse: {exc}".splitlines()[0],
                                      "re-save the adapter with PEFT") from exc
    unknown = sorted(k for k, v in (config.model_extra or {}).items() if v not in (None, False, {}, [], "")
                     and k not in _INERT)
    if unknown:
        raise UnsupportedAdapterError(f"{where} sets option(s) switchyard does not know: {', '.join(unknown)}",
                                      "serve it as an adapter, or ask for support for these options")
    return config
