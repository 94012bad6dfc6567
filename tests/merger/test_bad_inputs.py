"""Each bad input: one clear error, non-zero exit, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.api import MergeOptions, merge
from merger.errors import (InputError, NonFiniteError, OutputError, ShapeMismatchError, UnsupportedAdapterError)
from tests.merger.common import make_adapter, tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = tiny_model(root / "base", "llama")
    adapter = make_adapter(base, root / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    return base, adapter


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left


def test_adapter_for_another_base_names_module_and_shapes(pair, tmp_path):
    base, _ = pair
    other = tiny_model(tmp_path / "other", "qwen2")
    bad = make_adapter(other, tmp_path / "bad", r=4, target_modules=["up_proj"])
    small = tiny_model(tmp_path / "small", "gpt2")
    out = tmp_path / "out"
    with pytest.raises(ShapeMismatchError) as err:
        merge(small, [bad], out)
    assert "another base" in err.value.one_line()
    # same names, different shapes: a base with wider MLP
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "wide")
    ad = make_adapter(base, tmp_path / "ad-mlp", r=4, target_modules=["up_proj"])
    with pytest.raises(ShapeMismatchError) as err:
        merge(tmp_path / "wide", [ad], out)
    assert "model.layers.0.mlp.up_proj.weight" in err.value.problem and "(64, 32)" in err.value.problem
    assert "(48, 32)" in err.value.problem
    _nothing_written(tmp_path, out)


def test_truncated_and_missing_safetensors(pair, tmp_path):
    base, adapter = pair
    cut = _copy(base, tmp_path / "cut")
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        merge(cut, [adapter], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no model.safetensors"):
        merge(empty, [adapter], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_pickle_refused_unless_allowed(pair, tmp_path):
    base, adapter = pair
    pk = _copy(adapter, tmp_path / "pk")
    torch.save(load_file(pk / "adapter_model.safetensors"), pk / "adapter_model.bin")
    (pk / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="pickle"):
        merge(base, [pk], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")
    result = merge(base, [pk], tmp_path / "out", MergeOptions(allow_pickle=True))
    assert (result.out / "model.safetensors").exists()


def test_rank_larger_than_layer(pair, tmp_path):
    base, _ = pair
    big = make_adapter(base, tmp_path / "big", r=40, target_modules=["k_proj"])  # k_proj is (16, 32)
    with pytest.raises(UnsupportedAdapterError, match="rank 40"):
        merge(base, [big], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_nan_in_adapter_refused(pair, tmp_path):
    base, adapter = pair
    bad = _copy(adapter, tmp_path / "nan")
    t = load_file(bad / "adapter_model.safetensors")
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match="NaN"):
        merge(base, [bad], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_nan_produced_by_merge_refused(pair, tmp_path):
    base, adapter = pair
    bad = _copy(adapter, tmp_path / "huge")
    t = load_file(bad / "adapter_model.safetensors")
    for k in t:
        t[k] = t[k] * 1e30  # finite factors whose product overflows to Inf
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError):
        merge(base, [bad], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("peft_type", ["IA3", "PROMPT_TUNING", "LOHA"])
def test_non_lora_types_refused(pair, tmp_path, peft_type):
    base, adapter = pair
    other = _copy(adapter, tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError) as err:
        merge(base, [other], tmp_path / "out")
    assert peft_type in err.value.problem and "supported" in err.value.hint


@pytest.mark.parametrize("option, value", [("layer_replication", [[0, 2]]), ("use_qalora", True),
                                           ("init_lora_weights", "pissa"), ("some_future_option", 3)])
def test_unmergeable_options_refused_by_name(pair, tmp_path, option, value):
    base, adapter = pair
    other = _copy(adapter, tmp_path / "opt")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg[option] = value
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError) as err:
        merge(base, [other], tmp_path / "out")
    assert option in err.value.one_line()


def test_lora_bias_on_layer_without_bias_refused(tmp_path):
    base = tiny_model(tmp_path / "base", "qwen2")
    ad = make_adapter(base, tmp_path / "ad", r=2, target_modules=["o_proj"], lora_bias=True)
    with pytest.raises(UnsupportedAdapterError, match="no bias"):
        merge(base, [ad], tmp_path / "out")


def test_existing_output_needs_force(pair, tmp_path):
    base, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputError, match="--force"):
        merge(base, [adapter], out)
    assert (out / "keep").exists()
    merge(base, [adapter], out, MergeOptions(force=True))
    assert not (out / "keep").exists() and (out / "switchyard.json").exists()


def test_disk_full_mid_write_removes_partial_output(pair, tmp_path, monkeypatch):
    import errno

    from merger.io import writer

    base, adapter = pair
    real = writer.StreamingShardWriter._write
    calls = {"n": 0}

    def failing(self, shard, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OutputError("disk full while writing model.safetensors", "free space") from OSError(errno.ENOSPC, "")
        real(self, shard, data)

    monkeypatch.setattr(writer.StreamingShardWriter, "_write", failing)
    with pytest.raises(OutputError, match="disk full"):
        merge(base, [adapter], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_cli_one_line_error_and_exit_code(pair, tmp_path):
    base, adapter = pair
    proc = subprocess.run([sys.executable, "-m", "switchyard.cli", "merge", str(base), str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "adapter_config.json" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_nan_in_untouched_base_tensor_refused(pair, tmp_path):
    base, adapter = pair
    bad = _copy(base, tmp_path / "nanbase")
    t = load_file(bad / "model.safetensors")
    t["model.norm.weight"][3] = float("inf")  # a tensor the adapter does not touch
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="model.norm.weight"):
        merge(bad, [adapter], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_bit_check(dtype):
    from merger.executor import has_nonfinite

    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    ok = torch.tensor([0.0, -1.5, 3e4, -0.0], dtype=dtype)
    assert not has_nonfinite(ok.view(torch.uint8).numpy().tobytes(), name)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = ok.clone()
        t[1] = bad
        assert has_nonfinite(t.view(torch.uint8).numpy().tobytes(), name)


def test_passthrough_tensors_stream_in_slices_exactly(pair, tmp_path, monkeypatch):
    """Untouched tensors are copied from the map a slice at a time: with slices far smaller than
    the tensors, the output bytes, the recorded hashes, and a NaN found only in a late slice all
    come out as with whole tensors."""
    import hashlib

    import merger.executor as executor

    base, adapter = pair
    whole = merge(base, [adapter], tmp_path / "whole")
    monkeypatch.setattr(executor, "SLICE_BYTES", 256)
    sliced = merge(base, [adapter], tmp_path / "sliced")
    a, b = load_file(whole.out / "model.safetensors"), load_file(sliced.out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sliced.provenance["output"]["shards_sha256"] == whole.provenance["output"]["shards_sha256"]
    assert sliced.provenance["base"]["shards_sha256"]["model.safetensors"] == hashlib.sha256(
        (base / "model.safetensors").read_bytes()).hexdigest()
    bad = _copy(base, tmp_path / "nanlate")
    t = load_file(bad / "model.safetensors")
    emb = t["model.embed_tokens.weight"]
    assert emb.numel() * emb.element_size() > 4 * 256  # the NaN sits beyond the first slices
    emb.view(-1)[-1] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="embed_tokens"):
        merge(bad, [adapter], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_base_hash_runs_in_its_thread_and_is_recorded(pair, tmp_path, monkeypatch):
    """A first merge of a base hashes it in the `sha256-base` thread, 8 MiB (here 256 B) at a time,
    each slice's pages dropped once hashed; the hash is recorded and cached, so the next merge of the
    same base does not hash it again."""
    import hashlib
    import threading

    import merger.io.early as early_io

    base, adapter = pair
    monkeypatch.setattr(early_io, "SLICE_BYTES", 256)
    seen = []
    real_drop = early_io.drop_pages

    def drop_pages(m, lo, hi):
        seen.append((threading.current_thread().name, lo, hi))
        return real_drop(m, lo, hi)

    monkeypatch.setattr(early_io, "drop_pages", drop_pages)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # nothing cached: hash while merging
    res = merge(base, [adapter], tmp_path / "out")
    data = (base / "model.safetensors").read_bytes()
    assert {name for name, _, _ in seen} == {"sha256-base"}
    assert [(lo, hi) for _, lo, hi in seen] == [(lo, min(len(data), lo + 256)) for lo in range(0, len(data), 256)]
    assert res.provenance["base"]["shards_sha256"]["model.safetensors"] == hashlib.sha256(data).hexdigest()
    seen.clear()
    again = merge(base, [adapter], tmp_path / "out2")
    assert seen == []  # taken from the cache
    assert again.provenance["base"]["shards_sha256"] == res.provenance["base"]["shards_sha256"]


def test_a_write_error_is_not_masked_by_the_base_hash_thread(pair, tmp_path, monkeypatch):
    """The base hasher fails, and then the writer fails too: the user sees the write error (the
    merge's own), and nothing is left behind."""
    import time

    import merger.io.early as early_io
    import merger.io.writer as writer

    base, adapter = pair
    monkeypatch.setattr(early_io, "SLICE_BYTES", 256)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # hash while merging
    slices, parts = [0], [0]
    real_parts = writer.StreamingShardWriter.write_parts

    def drop_pages(m, lo, hi):
        slices[0] += 1
        if slices[0] == 2:
            time.sleep(0.3)
            raise RuntimeError("hasher failed")
        return 0

    def write_parts(self, name, data):
        parts[0] += 1
        if parts[0] == 3:
            raise OutputError("disk full while writing model.safetensors", "free space")
        return real_parts(self, name, data)

    monkeypatch.setattr(early_io, "drop_pages", drop_pages)
    monkeypatch.setattr(writer.StreamingShardWriter, "write_parts", write_parts)
    with pytest.raises(OutputError, match="disk full"):
        merge(base, [adapter], tmp_path / "out")
    assert slices[0] == 2
    _nothing_written(tmp_path, tmp_path / "out")


def test_a_base_that_cannot_be_read_for_its_hash_fails_the_merge(pair, tmp_path, monkeypatch):
    """A read error while hashing the base is an error of the merge (a provenance without the
    base's hash is not written), named, and nothing is left behind."""
    import merger.io.early as early_io

    base, adapter = pair
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))

    def drop_pages(m, lo, hi):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(early_io, "drop_pages", drop_pages)
    with pytest.raises(InputError, match="cannot read .*model.safetensors to hash it: Input/output error"):
        merge(base, [adapter], tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")
