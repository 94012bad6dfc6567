"""report.json and report.md from the raw record and its analysis; atomic publication of --out.

report.json: `config`, then per level and target vLLM `bench serve`'s fields (same names, same
units: `request_throughput` req/s, `output_throughput` tok/s, `*_ms` milliseconds, and its per-request
arrays `input_lens`, `output_lens`, `ttfts`, `itls`, `latencies`, `start_times`, `errors` in seconds),
B/A `comparisons` against the first target, and at the end every batch and every request record
(warm-ups included, flagged) so any statistic can be recomputed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from loadtests.analysis import LevelResult
from loadtests.records import RequestRecord, RunLog
from switchyard.files import replace_dir

REPORT_VERSION = 1
MD_COLUMNS = (  # (header, key, format)
    ("done", "completed", "{:d}"), ("failed", "failed", "{:d}"),
    ("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_token_throughput", "{:.1f}"),
    ("TTFT mean", "mean_ttft_ms", "{:.1f}"), ("TTFT p50", "p50_ttft_ms", "{:.1f}"),
    ("TTFT p90", "p90_ttft_ms", "{:.1f}"), ("TTFT p99", "p99_ttft_ms", "{:.1f}"),
    ("TPOT mean", "mean_tpot_ms", "{:.2f}"), ("TPOT p99", "p99_tpot_ms", "{:.2f}"),
    ("ITL mean", "mean_itl_ms", "{:.2f}"), ("ITL p50", "p50_itl_ms", "{:.2f}"),
    ("ITL p90", "p90_itl_ms", "{:.2f}"), ("ITL p99", "p99_itl_ms", "{:.2f}"),
    ("E2E mean", "mean_e2el_ms", "{:.1f}"), ("E2E p99", "p99_e2el_ms", "{:.1f}"),
)
COMPARED = ("output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
            "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms")


def vllm_arrays(requests: Sequence[RequestRecord]) -> dict[str, list]:
    """vLLM's per-request arrays for measured requests (seconds; failed ones give 0 / [])."""
    reqs = [r for r in requests if not r.warmup]
    return {
        "input_lens": [r.prompt_tokens or 0 for r in reqs],
        "output_lens": [r.output_tokens if r.success else 0 for r in reqs],
        "ttfts": [r.ttft if r.success else 0.0 for r in reqs],
        "itls": [r.itls if r.success else [] for r in reqs],
        "latencies": [r.e2el if r.success else 0.0 for r in reqs],
        "start_times": [r.start for r in reqs],
        "errors": [r.error or "" for r in reqs],
    }


def build_report(config: dict[str, Any], levels: Sequence[dict[str, Any]], results: Sequence[LevelResult],
                 log: RunLog) -> dict[str, Any]:
    """The report.json object. `levels` gives each level's label and settings (concurrency/rate)."""
    by_label = {r.label: r for r in results}
    out_levels = []
    for level in levels:
        res = by_label.get(level["label"])
        if res is None:
            continue
        targets = {}
        for t, summary in res.summaries.items():
            reqs = [r for r in log.requests if r.level == res.label and r.target == t]
            targets[t] = {**summary, **vllm_arrays(reqs)}
        out_levels.append({
            **level,
            "results": targets,
            "comparisons": {b: {k: e.to_dict() for k, e in c.items()} for b, c in res.comparisons.items()},
        })
    return {
        "report_version": REPORT_VERSION,
        "interrupted": log.interrupted,
        "config": config,
        "levels": out_levels,
        "batches": [b.to_dict() for b in log.batches],
        "requests": [r.to_dict() for r in log.requests],
    }


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = ["# switchyard load test", ""]
    if report["interrupted"]:
        lines += ["**Interrupted: partial results.**", ""]
    lines += ["- targets: " + ", ".join(f"`{t['label']}` ({t['model']} at {t['url']})" for t in cfg["targets"]),
              f"- workload: {cfg['workload']}",
              f"- per target and level: {cfg['per_level']}; warm-up {cfg['warmup']} (excluded); seed {cfg['seed']}",
              "- latencies in ms; throughput per target over the time its own batches ran", ""]
    for level in report["levels"]:
        lines += [f"## {level['label']}", ""]
        lines += ["| target | " + " | ".join(h for h, _, _ in MD_COLUMNS) + " |",
                  "|---|" + "---:|" * len(MD_COLUMNS)]
        for t, s in level["results"].items():
            cells = [_fmt(fmt, s.get(key)) for _, key, fmt in MD_COLUMNS]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
        base = next(iter(level["results"]), None)
        for b, comp in level["comparisons"].items():
            lines += [f"**{b} / {base}** (95% bootstrap interval)", "",
                      "| metric | " + f"{base} | {b} | ratio | 95% CI | verdict |", "|---|---:|---:|---:|---|---|"]
            for key in COMPARED:
                e = comp[key]
                ci = "n/a" if e["ci_low"] is None else f"{e['ci_low']:.3f} – {e['ci_high']:.3f}"
                lines.append(f"| {key} | {e['a']:.2f} | {e['b']:.2f} | {e['ratio']:.3f} | {ci} | {e['verdict']} |")
            lines.append("")
    failed = [r for r in report["requests"] if r["error"] and not r["warmup"]]
    if failed:
        lines += [f"## Failed requests ({len(failed)})", ""]
        lines += [f"- {r['target']} {r['level']} batch {r['batch']} #{r['index']}: {r['error']}" for r in failed[:20]]
        lines.append("")
    return "\n".join(lines)


def _fmt(fmt: str, v: Any) -> str:
    if v is None:
        return "–"
    return fmt.format(int(v)) if fmt.endswith("d}") else fmt.format(float(v))


# --- files -------------------------------------------------------------------------------------

def staging_dir(out: Path) -> Path:
    """A fresh folder beside `out` (same filesystem, so publishing is a rename)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: NaN and infinities (a ratio over zero) become null."""
    path.write_text(json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n")


def _finite(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def publish(tmp: Path, out: Path) -> Path:
    """Move the finished `tmp` folder to `out`, replacing an earlier report there."""
    return replace_dir(tmp, Path(out).resolve())
