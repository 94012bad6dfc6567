"""Tiny real models and PEFT adapters for the merger tests (random init, built in the test)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def tiny_model(path: Path, arch: str = "llama", tie: bool = False, dtype=torch.float32, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie))
    else:
        raise ValueError(arch)
    model.to(dtype).save_pretrained(path)
    return path


def make_adapter(base: Path, path: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with every trainable tensor randomised, so every delta is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
                else:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(path)
    return path


def peft_merged(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload in float64 (adapters merged in order)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    merged = pm.double().merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))])
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """Adapter-on-base (unmerged) logits in float64: what the adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    pm = PeftModel.from_pretrained(model, adapter).double().eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


def model_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_output(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
