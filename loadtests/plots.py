"""PNG plots of a report (matplotlib, Agg backend: no display needed).

- throughput.png: output tokens/s vs load level, one line per target
- latency_cdf.png: end-to-end latency CDF, one panel per level, one curve per target
- ttft.png, itl.png: distributions as box plots, grouped by level, one box per target
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every plot that has data; returns the files written."""
    levels = report["levels"]
    if not levels:
        return []
    plt = _plt()
    targets = [t["label"] for t in report["config"]["targets"]]
    written = [
        _throughput(plt, levels, targets, out_dir / "throughput.png"),
        _cdf(plt, levels, targets, out_dir / "latency_cdf.png"),
        _boxes(plt, levels, targets, "ttfts", "TTFT (ms)", out_dir / "ttft.png"),
        _boxes(plt, levels, targets, "itls", "inter-token latency (ms)", out_dir / "itl.png"),
    ]
    return [p for p in written if p is not None]


def _x(level: dict[str, Any]) -> float:
    return level["max_concurrency"] if level.get("max_concurrency") is not None else level["request_rate"]


def _throughput(plt, levels, targets, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [_x(l) for l in levels]
    for t in targets:
        ys = [l["results"].get(t, {}).get("output_throughput", np.nan) for l in levels]
        ax.plot(xs, ys, marker="o", label=t)
    rate = levels[0].get("max_concurrency") is None
    ax.set_xlabel("request rate (req/s)" if rate else "concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_title("Output throughput per target")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _cdf(plt, levels, targets, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.5), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for t in targets:
            lat = sorted(1000 * x for x, e in zip(level["results"].get(t, {}).get("latencies", []),
                                                  level["results"].get(t, {}).get("errors", [])) if not e)
            if lat:
                ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=t)
        ax.set_title(level["label"])
        ax.set_xlabel("end-to-end latency (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend()
    fig.suptitle("Latency CDF")
    return _save(plt, fig, path)


def _boxes(plt, levels, targets, key: str, ylabel: str, path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(levels) * len(targets)), 4))
    width = 0.8 / len(targets)
    any_data = False
    for i, t in enumerate(targets):
        data, pos = [], []
        for j, level in enumerate(levels):
            res = level["results"].get(t, {})
            values = res.get(key, [])
            errors = res.get("errors", [""] * len(values))
            if key == "itls":
                flat = [1000 * x for v, e in zip(values, errors) if not e for x in v]
            else:
                flat = [1000 * v for v, e in zip(values, errors) if not e]
            if flat:
                data.append(flat)
                pos.append(j + (i - (len(targets) - 1) / 2) * width)
        if data:
            any_data = True
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
            color = f"C{i}"
            for box in bp["boxes"]:
                box.set_facecolor(color)
                box.set_alpha(0.6)
            ax.plot([], [], color=color, linewidth=8, alpha=0.6, label=t)
    if not any_data:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(levels)), [l["label"] for l in levels])
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split(' (')[0]} distribution (whiskers 1.5 IQR, outliers hidden)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_timeline(report: dict[str, Any], path: Path) -> Path:
    """Swap timeline: each request's E2E and TTFT at its start time, failures marked, switches drawn."""
    plt = _plt()
    reqs = report["requests"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ok = [r for r in reqs if r["error"] is None and r["first_token"] is not None]
    bad = [r for r in reqs if r not in ok]
    ax.scatter([r["start"] for r in ok], [1000 * (r["end"] - r["start"]) for r in ok], s=6, label="E2E")
    ax.scatter([r["start"] for r in ok], [1000 * (r["first_token"] - r["start"]) for r in ok], s=6, label="TTFT")
    if bad:
        ax.scatter([r["start"] for r in bad], [1000 * (r["end"] - r["start"]) for r in bad], s=30,
                   marker="x", color="red", label=f"failed ({len(bad)})")
    for i, ev in enumerate(report["events"]):
        color = f"C{i + 2}"
        ax.axvspan(ev["start"], ev["end"], color=color, alpha=0.12)
        if ev["switched_at"] is not None:
            ax.axvline(ev["switched_at"], color=color, linestyle="--", label=f"{ev['action']} switch")
    ax.set_xlabel("request start (s since the load began)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report['name']}: steady load through promote and rollback (shaded: admin call running)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.plots DIR`: draw the plots of DIR/report.json into DIR (for a report
    made with --no-plots on a machine without matplotlib)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "report.json").is_file():
        print("usage: python -m loadtests.plots DIR  (DIR holds a load test's report.json)", file=sys.stderr)
        return 2
    out = Path(args[0])
    for path in write_plots(json.loads((out / "report.json").read_text()), out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
