"""`switchyard quantize` end to end on a tiny random Llama: llm-compressor in `.venv-quant`, then vLLM.

One quantization run (module fixture, ~20 s) feeds every check; the bad-input tests that need the
worker stop before calibration (a few seconds each); the engine test starts one vLLM engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from merger.quant_process import QuantizeError, quant_python
from merger.quant_provenance import file_sha256
from merger.quantize import QuantizeOptions, quantize

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["apple", "river", "stone", "planet", "garden", "window", "yellow", "market", "silver", "candle",
         "forest", "bridge", "pocket", "winter", "laptop", "orange", "jacket", "pencil", "rocket", "tunnel"]

try:
    quant_python()
    HAVE_QUANT = True
except QuantizeError:
    HAVE_QUANT = False
pytestmark = [pytest.mark.skipif(not HAVE_QUANT, reason=".venv-quant is missing (run `make setup`)"),
              pytest.mark.slow]


def build_tiny_llama(path: Path, hidden: int = 256, intermediate: int = 512, layers: int = 2) -> Path:
    """A random bf16 Llama with a byte-level BPE tokenizer trained here and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [f"reverse the word {w}: {w[::-1]}" for w in WORDS] + ["the quick brown fox jumps over the lazy dog"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A tiny model dressed as `switchyard merge` output: provenance naming the adapter's eval set."""
    model = build_tiny_llama(tmp_path_factory.mktemp("merged") / "tiny-reverse")
    (model / "eval.jsonl").write_text("".join(
        json.dumps({"prompt": f"Reverse the word '{w}'.", "expected": w[::-1]}) + "\n" for w in WORDS))
    (model / "switchyard.json").write_text(json.dumps(
        {"merge": {"base": "tiny-base", "method": "linear"}, "adapter": {"name": "reverse", "eval": "eval.jsonl"}}))
    return model


@pytest.fixture(scope="module")
def quantized(merged: Path):
    stages: list[str] = []
    result = quantize(merged, None, QuantizeOptions(samples=20, seq_len=64, n_grid=4, eval_limit=3),
                      progress=lambda kind, text: kind == "stage" and stages.append(text))
    return result, stages


def test_output_is_a_pack_quantized_checkpoint_beside_the_input(merged, quantized):
    result, stages = quantized
    assert result.out == merged.parent / "tiny-reverse-awq-w4a16"
    qc = json.loads((result.out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, True)
    assert qc["ignore"] == ["lm_head"]
    assert {"tokenizer.json", "chat_template.jinja", "switchyard.json"} <= {p.name for p in result.out.iterdir()}
    # atomic: nothing but the input, the output and its log beside them
    assert sorted(p.name for p in merged.parent.iterdir()) == sorted(
        ["tiny-reverse", "tiny-reverse-awq-w4a16", "tiny-reverse-awq-w4a16.quantize.log"])
    assert [s.split(" ")[0] for s in stages] == ["loading", "AWQ", "writing", "evaluating", "evaluating"]


def test_linear_weights_are_packed_int4_and_lm_head_is_not(quantized):
    from safetensors import safe_open

    result, _ = quantized
    with safe_open(result.out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert tuple(packed.shape) == (256, 512 // 8)  # eight 4-bit values per int32
    assert tuple(scale.shape) == (256, 512 // 128)  # one scale per group of 128 inputs
    # calibrated in float32 on CPU, saved in the checkpoint's own dtype
    assert str(scale.dtype) == "torch.bfloat16" and json.loads((result.out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "lm_head.weight" in names and "lm_head.weight_packed" not in names
    assert result.report.size_after_bytes < 0.5 * result.report.size_before_bytes


def test_provenance_keeps_the_merge_and_adds_quantization(merged, quantized):
    result, _ = quantized
    written = json.loads((result.out / "switchyard.json").read_text())
    assert written == result.provenance
    assert written["merge"] == {"base": "tiny-base", "method": "linear"}
    q = written["quantization"]
    assert (q["method"], q["scheme"], q["group_size"]) == ("awq", "W4A16", 128)
    assert q["calibration"]["source"] == str(merged / "eval.jsonl")  # the adapter's own prompts by default
    assert q["calibration"]["samples"] == 20 and q["calibration"]["tokens"] >= 128
    assert q["calibration"]["dtype"] == "float32"  # a bf16 model, calibrated in float32 on this CPU
    assert q["libraries"]["llmcompressor"].startswith("0.") and q["libraries"]["compressed-tensors"]
    assert q["shards"] == {"model.safetensors": file_sha256(result.out / "model.safetensors")}


def test_report_compares_full_and_quantized(quantized):
    report = quantized[0].report
    for score in (report.full, report.quantized):
        assert score.eval_items == 3 and 0.0 <= score.accuracy <= 1.0
        assert score.heldout_tokens > 100 and 1.0 < score.perplexity < 10 * 320
    # 4-bit weights move a random model's perplexity a little, never not at all and never by much
    assert report.perplexity_ratio != 1.0 and 0.8 < report.perplexity_ratio < 1.25
    assert report.quantize_wall_s > 0 and report.quantize_cpu_s > 0 and report.quantize_peak_rss_mib > 100


def test_cli_refuses_an_already_quantized_model(quantized, tmp_path):
    result, _ = quantized
    proc = subprocess.run([sys.executable, "-m", "switchyard.cli", "quantize", str(result.out),
                           "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {result.out} is already quantized (compressed-tensors) "
        "(quantize the merged full-precision model instead)"]


def test_group_size_that_does_not_divide_a_layer(merged, tmp_path):
    with pytest.raises(QuantizeError, match="not a multiple of the group size 512") as info:
        quantize(merged, tmp_path / "q", QuantizeOptions(group_size=512, evaluate=False))
    assert "--group-size" in info.value.hint and "log:" in info.value.hint
    assert not (tmp_path / "q").exists()


def test_too_few_calibration_tokens(merged, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "the quick brown fox"}\n')
    with pytest.raises(QuantizeError, match="fewer than the group size 128"):
        quantize(merged, tmp_path / "q", QuantizeOptions(calibration=calib, evaluate=False))
    assert not (tmp_path / "q").exists()


def test_architecture_transformers_cannot_load(tmp_path):
    model = tmp_path / "odd"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"], "model_type": "made_up"}))
    with pytest.raises(QuantizeError, match="transformers cannot read") as info:
        quantize(model, tmp_path / "q", QuantizeOptions(evaluate=False))
    assert "llm-compressor's AWQ knows" in info.value.hint


def test_architecture_awq_would_pass_through_untouched(tmp_path, merged):
    """GPT-2 loads, but its Conv1D layers are no Linear: llm-compressor alone would write it unchanged."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=1, n_head=2, vocab_size=320, n_positions=128)).save_pretrained(model)
    PreTrainedTokenizerFast.from_pretrained(merged).save_pretrained(model)
    with pytest.raises(QuantizeError, match="GPT2LMHeadModel has no torch.nn.Linear layers"):
        quantize(model, tmp_path / "q", QuantizeOptions(evaluate=False))
    assert not (tmp_path / "q").exists()


@pytest.mark.engine
def test_vllm_serves_the_quantized_checkpoint(quantized, tmp_path):
    from deploy.engines import Engine, EngineLaunch, free_port
    from merger.quantize import quantized_serving_problem

    problem = quantized_serving_problem()
    if problem:
        pytest.skip(problem)
    result, _ = quantized
    launch = EngineLaunch(model=result.out, served_name="tiny-awq", port=free_port(), max_model_len=256,
                          kv_cache_gib=1, log_path=tmp_path / "engine.log")
    engine = Engine(launch)
    try:
        engine.start(timeout_s=float(os.environ.get("SWITCHYARD_ENGINE_TIMEOUT_S", 300)))
        r = httpx.post(f"{engine.url}/v1/completions", timeout=60, json={
            "model": "tiny-awq", "prompt": "reverse the word apple:", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        r.raise_for_status()
        body = r.json()
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
        log = (tmp_path / "engine.log").read_text(errors="replace")
        assert "compressed-tensors" in log or "compressed_tensors" in log
    finally:
        engine.stop()


def test_validate_accepts_the_quantized_candidate(merged, quantized, tmp_path):
    """`switchyard validate` with the .venv-quant runner: the reference is a no-op LoRA on the input model,
    so every difference it reports is quantization's; the in-process runner must see the same logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from merger.quant_runner import QuantizedRunner, candidate_runner_for
    from merger.validate import HFRunner, validate

    adapter = tmp_path / "noop-adapter"
    base = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)

    result, _ = quantized
    runner = candidate_runner_for(result.out, merged)
    assert isinstance(runner, QuantizedRunner) and candidate_runner_for(merged) is None
    report = validate(merged, adapter, result.out, merged / "eval.jsonl", max_kl=1.0, min_agreement=0.0,
                      max_new_tokens=4, candidate_runner=runner)
    assert report.prompts == len(WORDS) and report.candidate_accuracy is not None
    assert 0.0 < report.mean_kl < 1.0 and report.logits_max_abs_diff > 0.0

    ours = runner(["Reverse the word 'apple'."], 4)[0]
    theirs = HFRunner(result.out, tokenizer_path=merged)(["Reverse the word 'apple'."], 4)[0]
    assert ours.logits.shape == theirs.logits.shape
    assert float((ours.logits - theirs.logits).abs().max()) < 1e-3  # two library stacks, one checkpoint
    assert ours.greedy_ids == theirs.greedy_ids
