"""Fast tests of quantize's pure parts and its bad-input errors (no llm-compressor run)."""

from __future__ import annotations

import json
import math
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from merger.calibration import (
    BUILTIN_CALIBRATION,
    BUILTIN_HELDOUT,
    CalibrationFormatError,
    load_samples,
    parse_eval_items,
    parse_samples,
)
from merger.quant_process import QuantizeError, quant_python, run_worker
from merger.quant_provenance import calibration_set_from_provenance, eval_set_from_provenance, quantization_record, shard_digests, weights_size
from merger.quant_worker import event_line, exact_match, indivisible_layers, matches_ignore, parse_event, perplexity
from merger.quantize import (
    ModelScore,
    QuantizeOptions,
    QuantizeReport,
    check_model,
    check_options,
    cpu_serving_problem,
    default_out,
    quantize,
)
from switchyard.errors import SwitchyardError


# --- calibration formats ------------------------------------------------------------------------

def test_parse_samples_normalises_every_accepted_shape():
    lines = [
        json.dumps({"text": "plain"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"prompt": "reverse abc", "expected": "cba"}),
        json.dumps({"prompt": "alone"}),
        json.dumps({"text": "   "}),
    ]
    assert parse_samples(lines) == [
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]},
        {"messages": [{"role": "user", "content": "alone"}]},
    ]


@pytest.mark.parametrize("line, needle", [
    ("not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"body": "x"}', "'text', 'messages' or 'prompt'"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be"),
])
def test_parse_samples_names_the_bad_line(line, needle):
    with pytest.raises(CalibrationFormatError, match=needle) as info:
        parse_samples(["{\"text\": \"ok\"}", line], "calib.jsonl")
    assert "calib.jsonl:2" in str(info.value)


def test_parse_eval_items_requires_prompt_and_expected():
    assert parse_eval_items(['{"prompt": "a", "expected": "b", "extra": 1}']) == [{"prompt": "a", "expected": "b"}]
    with pytest.raises(CalibrationFormatError, match=":1:"):
        parse_eval_items(['{"prompt": "a"}'])
    with pytest.raises(CalibrationFormatError, match=r"^eval.jsonl:3: not JSON"):  # blank lines count
        parse_eval_items(['{"prompt": "a", "expected": "b"}', "", "nope"], "eval.jsonl")


def test_builtin_corpora_parse_and_do_not_overlap():
    calib, held = load_samples(BUILTIN_CALIBRATION), load_samples(BUILTIN_HELDOUT)
    assert len(calib) >= 48 and len(held) >= 8
    assert {"text", "messages"} <= {k for s in calib for k in s}
    key = lambda s: json.dumps(s, sort_keys=True)  # noqa: E731
    assert not {key(s) for s in calib} & {key(s) for s in held}


# --- worker helpers ----------------------------------------------------------------------------

def test_event_lines_round_trip_and_ordinary_output_is_not_an_event():
    line = event_line("result", job="quantize", result={"samples": 3})
    assert parse_event("noise before " + line) == {"event": "result", "job": "quantize", "result": {"samples": 3}}
    assert parse_event("Smoothing: 100%|####| 3/3") is None
    assert parse_event("@@switchyard {not json") is None


def test_indivisible_layers_lists_only_the_bad_widths():
    widths = {"q_proj": 256, "down_proj": 576, "o_proj": 128, "odd": 100}
    assert indivisible_layers(widths, 128) == [("down_proj", 576), ("odd", 100)]
    assert indivisible_layers(widths, 4) == []


def test_ignore_patterns_follow_llm_compressor_syntax():
    assert matches_ignore("lm_head", ["lm_head"])
    assert matches_ignore("model.layers.0.mlp.down_proj", ["re:.*down_proj$"])
    assert matches_ignore("model.layers.0.mlp.down_proj", ["down_proj"])
    assert not matches_ignore("model.layers.0.mlp.up_proj", ["lm_head", "re:.*down_proj$"])


def test_exact_match_and_perplexity():
    assert exact_match(" cba\n", "cba") and not exact_match("cb a", "cba")
    assert perplexity(0.0, 10) == 1.0
    assert math.isclose(perplexity(10 * math.log(7.0), 10), 7.0)
    assert perplexity(1.0, 0) == math.inf


# --- options, models, provenance ---------------------------------------------------------------

def test_default_out_names_method_and_scheme(tmp_path):
    assert default_out(tmp_path / "reverse-merged", QuantizeOptions()) == tmp_path / "reverse-merged-awq-w4a16"
    assert default_out(tmp_path / "m", QuantizeOptions(scheme="W4A16_ASYM")).name == "m-awq-w4a16-asym"


@pytest.mark.parametrize("options, needle", [
    (QuantizeOptions(method="gptq"), "unknown quantization method"),
    (QuantizeOptions(scheme="W8A8"), "unknown scheme"),
    (QuantizeOptions(group_size=100), "not a power of two"),
    (QuantizeOptions(samples=0), "--samples"),
    (QuantizeOptions(seq_len=1), "--seq-len"),
    (QuantizeOptions(n_grid=2), "grid of 2 points"),
])
def test_check_options_rejects_bad_values(options, needle):
    with pytest.raises(QuantizeError, match=needle):
        check_options(options)


def test_check_options_accepts_defaults_and_asym():
    check_options(QuantizeOptions())
    check_options(QuantizeOptions(scheme="w4a16_asym", group_size=64))


def test_check_model_refuses_missing_and_quantized(tmp_path):
    with pytest.raises(QuantizeError, match="not a model folder"):
        check_model(tmp_path, None, None)
    with pytest.raises(QuantizeError, match=r"already quantized \(compressed-tensors\)") as info:
        check_model(tmp_path, {"quantization_config": {"quant_method": "compressed-tensors"}}, None)
    assert "merged full-precision" in info.value.hint
    with pytest.raises(QuantizeError, match=r"already quantized \(awq\)"):
        check_model(tmp_path, {}, {"quantization": {"method": "awq"}})
    check_model(tmp_path, {"architectures": ["LlamaForCausalLM"]}, {"merge": {}})
    assert issubclass(QuantizeError, SwitchyardError)


def test_eval_set_from_provenance_resolves_relative_to_the_model(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "reverse.jsonl").write_text('{"prompt": "a", "expected": "a"}\n')
    model = tmp_path
    assert eval_set_from_provenance({"adapter": {"eval": "eval/reverse.jsonl"}}, model) == (tmp_path / "eval" / "reverse.jsonl").resolve()
    assert eval_set_from_provenance({"adapters": [{"eval": str(tmp_path / "eval" / "reverse.jsonl")}]}, model) is not None
    assert eval_set_from_provenance({"adapter": {"eval": "eval/missing.jsonl"}}, model) is None
    assert eval_set_from_provenance(None, model) is None


def test_eval_set_from_a_merge_provenance_follows_the_adapter(tmp_path):
    """`switchyard merge` records the adapter's path; the demo keeps eval sets in <root>/eval/<name>.jsonl."""
    adapter = tmp_path / "demo" / "adapters" / "reverse"
    adapter.mkdir(parents=True)
    (tmp_path / "demo" / "eval").mkdir()
    (tmp_path / "demo" / "eval" / "reverse.jsonl").write_text('{"prompt": "a", "expected": "a"}\n')
    prov = {"schema": "switchyard.merge/v1", "adapters": [{"name": "reverse", "path": str(adapter)}]}
    evals = (tmp_path / "demo" / "eval" / "reverse.jsonl").resolve()
    assert eval_set_from_provenance(prov, tmp_path / "merged") == evals
    assert calibration_set_from_provenance(prov, tmp_path / "merged") == evals  # no training prompts: eval
    (tmp_path / "demo" / "train").mkdir()
    (tmp_path / "demo" / "train" / "reverse.jsonl").write_text('{"prompt": "b", "expected": "b"}\n')
    assert calibration_set_from_provenance(prov, tmp_path / "merged") == (tmp_path / "demo" / "train" / "reverse.jsonl").resolve()
    assert eval_set_from_provenance(prov, tmp_path / "merged") == evals
    (adapter / "train.jsonl").write_text('{"prompt": "c", "expected": "c"}\n')
    assert calibration_set_from_provenance(prov, tmp_path / "merged") == (adapter / "train.jsonl").resolve()
    two = {"adapters": [{"name": "reverse", "path": str(adapter)}, {"name": "sort", "path": str(adapter)}]}
    assert eval_set_from_provenance(two, tmp_path / "merged") is None  # whose prompts? not guessed


def test_shards_digest_and_size(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"abc")
    (tmp_path / "b.safetensors").write_bytes(b"12345")
    (tmp_path / "config.json").write_text("{}")
    digests = shard_digests(tmp_path)
    assert digests == {"a.safetensors": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                       "b.safetensors": digests["b.safetensors"]} and len(digests) == 2
    assert weights_size(tmp_path) == 8


def test_quantization_record_carries_what_the_issue_lists(tmp_path):
    record = quantization_record(
        QuantizeOptions(), tmp_path, "builtin",
        {"samples": 5, "tokens": 600, "architecture": "LlamaForCausalLM", "libraries": {"llmcompressor": "0.14"}},
        {"accuracy_drop": 0.0}, {"model.safetensors": "ff"}, datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert record["method"] == "awq" and record["scheme"] == "W4A16" and record["group_size"] == 128
    assert record["calibration"] == {"source": "builtin", "samples": 5, "tokens": 600, "seq_len": 512, "dtype": None}
    assert record["libraries"] == {"llmcompressor": "0.14"} and record["shards"] == {"model.safetensors": "ff"}
    assert record["created_at"] == "2026-01-02T00:00:00+00:00"


def test_report_deltas():
    full, quant = ModelScore(0.9, 10.0, 20, 300), ModelScore(0.85, 11.0, 20, 300)
    report = QuantizeReport(full, quant, 100, 30, 1.0, 10.0, 5, 600)
    assert math.isclose(report.accuracy_drop, 0.05) and math.isclose(report.perplexity_ratio, 1.1)
    assert QuantizeReport(None, None, 1, 1, 0, 0, 1, 1).accuracy_drop is None
    assert report.to_dict()["quantized"]["accuracy"] == 0.85


# --- bad input at the edge (no model is ever loaded) ---------------------------------------------

def _model_folder(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def test_missing_quant_venv_says_run_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_QUANT_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(QuantizeError, match="quantization environment is missing") as info:
        quant_python()
    assert "make setup" in info.value.hint
    model = _model_folder(tmp_path / "m")
    with pytest.raises(QuantizeError, match="missing"):
        quantize(model, tmp_path / "out", QuantizeOptions(evaluate=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # failed before writing anything


def test_calibration_missing_or_empty(tmp_path):
    model = _model_folder(tmp_path / "m")
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize(model, tmp_path / "out", QuantizeOptions(calibration=tmp_path / "none.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(QuantizeError, match="is empty"):
        quantize(model, tmp_path / "out", QuantizeOptions(calibration=tmp_path / "empty.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "m"]


def test_heldout_missing_or_empty(tmp_path):
    model = _model_folder(tmp_path / "m")
    with pytest.raises(QuantizeError, match="held-out file .* does not exist"):
        quantize(model, tmp_path / "out", QuantizeOptions(heldout=tmp_path / "none.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QuantizeError, match="held-out file .* is empty"):
        quantize(model, tmp_path / "out", QuantizeOptions(heldout=tmp_path / "empty.jsonl"))


def test_perplexity_text_is_the_unseen_eval_set_else_builtin():
    from merger.quantize import _heldout

    items = [{"prompt": "reverse: a b", "expected": "b a"}]
    source, samples = _heldout(QuantizeOptions(), items, eval_is_unseen=True)
    assert source.startswith("eval set") and samples == [{"messages": [
        {"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": "b a"}]}]
    source, samples = _heldout(QuantizeOptions(), items, eval_is_unseen=False)  # calibrated on it
    assert source == "builtin" and samples == load_samples(BUILTIN_HELDOUT)
    assert _heldout(QuantizeOptions(), [], eval_is_unseen=True)[0] == "builtin"


def test_existing_output_needs_force(tmp_path):
    model = _model_folder(tmp_path / "m")
    (tmp_path / "out").mkdir()
    with pytest.raises(QuantizeError, match="already exists") as info:
        quantize(model, tmp_path / "out", QuantizeOptions())
    assert "--force" in info.value.hint


def _fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in interpreter that ignores the worker and prints `body`: the driver's side of the protocol."""
    exe = tmp_path / "fake-python"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_worker_error_event_becomes_one_line_with_hint_and_log(tmp_path):
    err = event_line("error", kind="group_size", message="2 layer(s) of LlamaForCausalLM have ...")
    exe = _fake_python(tmp_path, f"echo 'loading'\necho '{err}'\nexit 3\n")
    log = tmp_path / "q.log"
    with pytest.raises(QuantizeError) as info:
        run_worker(exe, {"job": "quantize"}, tmp_path, log)
    assert info.value.problem == "2 layer(s) of LlamaForCausalLM have ..."
    assert "--group-size" in info.value.hint and str(log) in info.value.hint
    assert "loading" in log.read_text()


def test_worker_crash_names_the_last_error_line(tmp_path):
    exe = _fake_python(tmp_path, "echo 'Traceback (most recent call last):'\necho 'RuntimeError: boom' >&2\nexit 1\n")
    with pytest.raises(QuantizeError, match=r"exited with code 1: RuntimeError: boom"):
        run_worker(exe, {"job": "evaluate"}, tmp_path, tmp_path / "q.log")


def test_worker_result_and_progress(tmp_path):
    res = event_line("result", job="quantize", result={"samples": 2})
    stage = event_line("stage", stage="load", message="loading m")
    exe = _fake_python(tmp_path, f"echo '{stage}'\nprintf 'bar 1/2\\rbar 2/2\\n'\necho '{res}'\n")
    seen = []
    assert run_worker(exe, {"job": "quantize"}, tmp_path, tmp_path / "q.log",
                      progress=lambda k, t: seen.append((k, t))) == {"samples": 2}
    assert seen == [("stage", "loading m"), ("output", "bar 1/2"), ("output", "bar 2/2")]


def test_cpu_serving_needs_avx512():
    assert cpu_serving_problem({"fpu", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}) is None
    problem = cpu_serving_problem({"fpu", "avx", "avx2", "fma"})
    assert "AVX-512" in problem and "merged model" in problem


class _Tok:
    chat_template = "x"

    def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}</s>" for m in msgs)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_perplexity_scores_only_the_reply_of_a_chat():
    from merger.quant_worker import scored_span

    chat = {"messages": [{"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": " b a"}]}
    assert scored_span(chat, _Tok()) == ("<user>reverse: a b</s><assistant>", " b a</s>")
    assert scored_span({"text": "plain words"}, _Tok()) == ("", "plain words")
