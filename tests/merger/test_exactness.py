"""switchyard merge vs PEFT's merge_and_unload in float64, for every LoRA-family kind."""

from __future__ import annotations

import pytest
import torch

from merger.api import MergeOptions, merge
from tests.merger.common import load_output, make_adapter, model_logits, peft_logits, peft_merged, tiny_model

CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-rslora": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                     rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 3},
                                     alpha_pattern={"q_proj": 3, "model.layers.0.mlp.up_proj": 5})),
    "llama-regex-layers": ("llama", dict(r=2, lora_alpha=4, target_modules=r".*\.layers\.1\..*\.(q_proj|down_proj)")),
    "llama-layers-list": ("llama", dict(r=2, target_modules=["k_proj", "o_proj"], layers_to_transform=[0])),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-embedding-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True)),
    "llama-modules-to-save": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "llama-trainable-tokens": ("llama", dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 7, 20])),
    "qwen2-bias": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all",
                                 lora_bias=True)),
    "qwen2-dora-lora-only-bias": ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj"], use_dora=True,
                                                bias="lora_only")),
    "gpt2-fan-in-fan-out": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
                                         fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_float64(case, tmp_path):
    arch, kwargs = CASES[case]
    base = tiny_model(tmp_path / "base", arch)
    adapter = make_adapter(base, tmp_path / "adapter", **kwargs)
    out = merge(base, [adapter], tmp_path / "out", MergeOptions(precise=True)).out
    ref = peft_merged(base, [adapter])
    got = load_output(out)
    assert set(got) == set(ref) - {k for k in ref if k == "lm_head.weight" and k not in got}
    changed = 0
    for name, want in ref.items():
        if name not in got:
            continue
        # float32 output of a float64 computation: equal to want rounded once to float32
        torch.testing.assert_close(got[name].double(), want, rtol=2e-7, atol=1e-7, msg=name)
        base_t = load_output(base)[name] if name in load_output(base) else None
        changed += base_t is not None and not torch.equal(base_t, got[name])
    assert changed > 0  # the adapter did change something


def test_sequential_two_adapters_matches_peft(tmp_path):
    base = tiny_model(tmp_path / "base", "llama")
    a = make_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, r=2, target_modules=["v_proj", "up_proj"], use_dora=True)
    out = merge(base, [a, b], tmp_path / "out", MergeOptions(precise=True)).out
    ref = peft_merged(base, [a, b])
    got = load_output(out)
    for name, want in ref.items():
        torch.testing.assert_close(got[name].double(), want, rtol=2e-7, atol=1e-7, msg=name)


@pytest.mark.parametrize("kwargs, stays_tied", [
    (dict(r=4, target_modules=["lm_head"]), False),
    (dict(r=4, target_modules=["embed_tokens"]), False),
    (dict(r=4, target_modules=["embed_tokens", "lm_head"]), False),  # both change, differently
    (dict(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 9]), True),
])
def test_tied_embeddings_follow_the_adapter(kwargs, stays_tied, tmp_path):
    """With tied embeddings, the output computes what adapter-on-base computes (untied when needed)."""
    import json

    base = tiny_model(tmp_path / "base", "llama", tie=True)
    adapter = make_adapter(base, tmp_path / "adapter", **kwargs)
    result = merge(base, [adapter], tmp_path / "out", MergeOptions(precise=True))
    cfg = json.loads((result.out / "config.json").read_text())
    assert cfg.get("tie_word_embeddings", True) is stays_tied
    assert ("lm_head.weight" in load_output(result.out)) is (not stays_tied)
    assert bool(result.notes) is (not stays_tied)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model_logits(result.out, ids), peft_logits(base, adapter, ids), rtol=1e-5, atol=1e-5)
