"""The demo's deployment file, rendered as TOML text (pure; `switchyard.config` parses it)."""

from __future__ import annotations

ENGINE = {
    "max_lora_rank": 8,
    "max_loras": 4,
    "max_model_len": 256,
    "kv_cache_gib": 1,
    "dtype": "auto",  # each checkpoint's own dtype: bf16 for the demo base
    "start_timeout_s": 300,
}


def _value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def deployment_toml(base_name: str, adapters: dict[str, str], recipe_sha: str) -> str:
    """`adapters` maps stable name -> task; paths are relative to the demo folder."""
    lines = [
        f"# written by `switchyard demo build` (recipe {recipe_sha[:12]}); paths are relative to this file",
        "",
        "[base]",
        'model = "base"',
        f"name = {_value(base_name)}",
        "",
        "[engine]",
        *(f"{k} = {_value(v)}" for k, v in ENGINE.items()),
        "extra_args = []",
        "",
        "[gateway]",
        'host = "127.0.0.1"',
        "port = 8000",
        'adapters_root = "adapters"',
        'state_dir = "state"',
        "",
        "[gates]",
        "max_accuracy_drop = 0.05",
        "max_kl = 0.1",
        "",
        "[deploy]",
        'quantize = "auto"  # awq where this vLLM can serve 4-bit (CUDA, AVX-512 CPU), else none',
        "keep_adapter_loaded = true",
    ]
    for name, task in adapters.items():
        lines += ["", "[[adapters]]", f"name = {_value(name)}", f'path = "adapters/{task}"',
                  f'eval = "eval/{task}.jsonl"', f'calibration = "train/{task}.jsonl"']
    return "\n".join(lines) + "\n"
