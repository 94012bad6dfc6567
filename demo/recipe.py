"""The build recipe: every knob that changes the demo artifacts, and the hash that caches them.

`recipe_hash` covers the recipe's fields AND the demo package's own source files, so editing a
generator or the training loop rebuilds the demo, while editing anything outside `demo/` does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    tasks: tuple[str, ...] = ("reverse", "sort")
    # tokenizer and model: head_dim 64 and Linear in_features multiples of 128 (AWQ group size)
    tokenizer_corpus: int = 20_000  # pretraining samples the BPE is trained on
    vocab_size: int = 1024  # BPE target; the model's vocab is the tokenizer's length rounded up to 64
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    dtype: str = "bfloat16"  # saved (and evaluated) weights; training runs in float32
    # pretraining the base (full model)
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 1.5e-3  # 3e-3 and 5e-3 never learned to copy in 1000 steps
    echo_fraction: float = 0.9  # chat turns of the echo task; the rest are plain sentences
    # one LoRA per task (loss on the answer tokens only)
    n_train: int = 4000
    n_eval: int = 100
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_steps: int = 400
    lora_batch: int = 32
    lora_lr: float = 1e-3
    threads: int = 1  # 2 threads spin-wait badly on a shared 2-core machine (10x slower measured)
    max_new_tokens: int = 32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def source_files(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.glob("*.py") if p.is_file())


def recipe_hash(recipe: Recipe, package_dir: Path | None = None) -> str:
    """sha256 over the recipe's fields and the demo package's .py sources (by name and content)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    h = hashlib.sha256()
    h.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    for path in source_files(package_dir):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
