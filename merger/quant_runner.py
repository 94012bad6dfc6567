"""A `merger.validate.Runner` for quantized candidates: the model runs in `.venv-quant`, where the
library that wrote the compressed-tensors checkpoint also reads it.

The prompts are tokenized here with the base's tokenizer (`merger.validate.encode_prompt`), so the
reference and the candidate see the same token ids; the worker returns float32 logits in a
safetensors file and the greedy completions' ids, which are decoded here with the same tokenizer.
Memory bound: all prompts' logits at once (tokens x vocab x 4 bytes each), as the in-process runner.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from merger.quant_process import ProgressFn, run_worker


def is_quantized(model: Path) -> bool:
    """True when the folder's config.json carries a `quantization_config` (e.g. `switchyard quantize` output)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("quantization_config"))


class QuantizedRunner:
    """Runs a quantized checkpoint through `.venv-quant` (one subprocess per call)."""

    def __init__(self, model_path: Path, tokenizer_path: Optional[Path] = None, *, dtype: str = "float32",
                 quant_python: Optional[Path] = None, log_path: Optional[Path] = None,
                 progress: Optional[ProgressFn] = None) -> None:
        from transformers import AutoTokenizer

        self.model_path = Path(model_path).resolve()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self.dtype = dtype
        self.quant_python = quant_python
        self.log_path = log_path
        self.progress = progress

    def __call__(self, prompts: Sequence[str], max_new_tokens: int):
        from safetensors.torch import load_file

        from merger.validate import RunOutput, encode_prompt

        token_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        work = Path(tempfile.mkdtemp(prefix="switchyard-qrun-"))
        # outside `work`, so a failure's message can point at it
        log = self.log_path or Path(tempfile.gettempdir()) / f"switchyard-quantized-runner-{self.model_path.name}.log"
        try:
            result = run_worker(self.quant_python, {
                "job": "prompts", "model": str(self.model_path), "token_ids": token_ids,
                "max_new_tokens": max_new_tokens, "dtype": self.dtype, "out": str(work / "logits.safetensors"),
                "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            }, work, log, self.progress)
            logits = load_file(work / "logits.safetensors")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        outs = []
        for i, greedy in enumerate(result["greedy_ids"]):
            outs.append(RunOutput(logits[f"logits_{i}"], tuple(greedy),
                                  self.tokenizer.decode(greedy, skip_special_tokens=True)))
        return outs


def candidate_runner_for(candidate: Path, tokenizer_path: Optional[Path] = None) -> Optional[QuantizedRunner]:
    """The runner `switchyard validate` should use for `candidate`: QuantizedRunner for a quantized
    checkpoint, None (validate's in-process transformers runner) for a plain one."""
    return QuantizedRunner(candidate, tokenizer_path) if is_quantized(candidate) else None
