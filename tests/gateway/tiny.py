"""Tiny real files for adapter checks: a 2-layer base checkpoint's weights and PEFT-format adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTER = 16, 32


def write_base(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((64, HIDDEN), dtype=np.float32)}
    for i in range(2):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{m}.weight"] = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((INTER, HIDDEN), dtype=np.float32)
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, INTER), dtype=np.float32)
        t[p + "input_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return folder


def write_adapter(folder: Path, r: int = 2, targets=("q_proj", "v_proj"), config_r: int | None = None,
                  shapes: dict | None = None, extra_tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    t = {}
    for i in range(2):
        for m in targets:
            out_f, in_f = (INTER, HIDDEN) if m == "up_proj" else (HIDDEN, HIDDEN)
            kind = "mlp" if m.endswith("up_proj") else "self_attn"
            key = f"base_model.model.model.layers.{i}.{kind}.{m}"
            a, b = (shapes or {}).get(m, ((r, in_f), (out_f, r)))
            t[key + ".lora_A.weight"] = rng.standard_normal(a, dtype=np.float32)
            t[key + ".lora_B.weight"] = rng.standard_normal(b, dtype=np.float32)
    t.update(extra_tensors or {})
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config_r or r, "lora_alpha": 2 * r, "target_modules": list(targets),
        "base_model_name_or_path": "tiny"}))
    return folder
