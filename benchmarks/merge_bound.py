"""A bound, not a product: the common-case merge with no torch in the process (the product now has
that path too, merger/core/fast.py; this stays as the measure of what the product adds to it).

What would a `switchyard merge` without `import torch` on its common path (one LoRA on bf16 linear
layers, CPU) gain? This script does that case alone: adapter factors read with numpy, each ~2 MiB
chunk's rows of s*B@A by numpy's GEMM (OpenBLAS, one thread), then merger/native's fused pass, the
output streamed by switchyard's own writer with its sha256 per shard (the provenance's cost kept).
It skips what a product must do besides: the plan's checks, rounding statistics in the provenance,
config/tokenizer files, the model card. Timed as a whole process against `switchyard merge` and
`cp` (docs/benchmarks.md, Merge, tenth session):

    B=/tmp/switchyard-merge-bench/tinyllama   # left there by benchmarks/merge.py
    /usr/bin/time -f "%e s %U+%S" .venv/bin/python benchmarks/merge_bound.py $B/base $B/adapter $B/bound-out
    .venv/bin/python benchmarks/merge_bound.py $B/base $B/adapter $B/bound-out --compare $B/sy-out

`--compare DIR`: count the output elements that differ from a switchyard merge in DIR (numpy's GEMM
against torch's: same float32 math, maybe another summation order).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: the two workers are the parallelism

import argparse  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from merger import native  # noqa: E402
from merger.core.adapter_config import parse_adapter_config  # noqa: E402
from merger.core.fast import CHUNK_ELEMENTS, ST_TO_NUMPY, to_float32  # noqa: E402
from merger.io.checkpoint import Checkpoint, ShardReader, has_nonfinite, read_shard_header  # noqa: E402
from merger.io.writer import OutTensor, StreamingShardWriter, index_json, plan_shards  # noqa: E402

SLICE_BYTES = 64 << 20  # as merger/executor.py
PREFIX = "base_model.model."


def as_float32(raw: memoryview, dtype: str, shape) -> np.ndarray:
    if dtype not in ST_TO_NUMPY:
        raise SystemExit(f"adapter dtype {dtype}: not in this bound")
    return to_float32(np.frombuffer(raw, dtype=ST_TO_NUMPY[dtype]).reshape(shape))


def load_factors(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """base tensor name -> (s*B, A) in float32, for plain linear LoRA modules."""
    config = parse_adapter_config(json.loads((adapter / "adapter_config.json").read_text()), str(adapter))
    if config.use_dora or config.fan_in_fan_out:
        raise SystemExit("DoRA / fan_in_fan_out: not in this bound")
    path = adapter / "adapter_model.safetensors"
    header = read_shard_header(path)
    with open(path, "rb") as f:
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for info in header.tensors:
        key = info.name[len(PREFIX):] if info.name.startswith(PREFIX) else info.name
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                mod = key[: -len(f".{part}.weight")]
                parts.setdefault(mod, {})[part] = as_float32(view[info.begin:info.end], info.dtype, info.shape)
                break
        else:
            raise SystemExit(f"{info.name}: not in this bound")
    out = {}
    for mod, p in parts.items():
        a, b = p["lora_A"], p["lora_B"]
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise SystemExit(f"{mod}: NaN/Inf in the adapter")
        out[f"{mod}.weight"] = (np.ascontiguousarray(b * np.float32(config.scaling(mod))), np.ascontiguousarray(a))
    return out


def merge(base: Path, adapter: Path, out: Path) -> dict[str, str]:
    kernel = native.merge_bf16()
    if kernel is None:
        raise SystemExit(f"no native kernel: {native.last_error}")
    factors = load_factors(adapter)
    ckpt = Checkpoint.open(base)
    infos = list(ckpt.tensors.values())
    if any(i.dtype != "BF16" for i in infos):
        raise SystemExit("a non-bf16 base tensor: not in this bound")
    missing = set(factors) - set(ckpt.tensors)
    if missing:
        raise SystemExit(f"adapter modules not in the base: {sorted(missing)[:3]}")
    plans = plan_shards([OutTensor(i.name, i.dtype, i.shape) for i in infos], 2 * 10**9)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StreamingShardWriter(tmp, plans)
    readers = {s.path: ShardReader(s.path) for s in ckpt.shards}
    free: list = []  # output buffers back from the writer (at most two exist)
    lock = threading.Lock()

    def work(info):
        if info.name not in factors:
            return None
        left, right = factors[info.name]
        rows_total, cols = info.shape
        b = np.frombuffer(readers[info.shard].view(info), dtype=np.uint16).reshape(rows_total, cols)
        with lock:
            buf = free.pop() if free and len(free[-1]) >= info.nbytes else None
        buf = buf if buf is not None else mmap.mmap(-1, info.nbytes)
        o = np.frombuffer(buf, dtype=np.uint16, count=info.numel).reshape(rows_total, cols)
        rows = max(1, CHUNK_ELEMENTS // cols)
        scratch = np.empty((rows, cols), dtype=np.float32)
        sums, same = np.zeros(2), np.zeros(1, dtype=np.int64)
        for s in range(0, rows_total, rows):
            bs, d = b[s:s + rows], scratch[: min(rows, rows_total - s)]
            np.matmul(left[s:s + rows], right, out=d)
            before = float(sums[0])
            kernel(bs.ctypes.data, d.ctypes.data, o[s:s + rows].ctypes.data, bs.size, sums.ctypes.data,
                   same.ctypes.data)
            if not np.isfinite(float(sums[0]) - before):
                raise SystemExit(f"{info.name}: NaN/Inf after merging")
        readers[info.shard].release(info.begin, info.end)
        return buf

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque = deque()
        it = iter(infos)
        for info in it:
            pending.append((info, pool.submit(work, info)))
            if len(pending) >= 2:
                break
        while pending:
            info, fut = pending.popleft()
            buf = fut.result()
            if buf is None:
                reader = readers[info.shard]
                view = reader.view(info)

                def slices(view=view, info=info, reader=reader):
                    for off in range(0, max(1, info.nbytes), SLICE_BYTES):
                        part = view[off:off + SLICE_BYTES]
                        if has_nonfinite(part, "BF16"):
                            raise SystemExit(f"{info.name}: NaN/Inf in the base")
                        yield part
                        reader.release(info.begin + off, info.begin + off + len(part))
                writer.write_parts(info.name, slices())
            else:
                writer.write(info.name, memoryview(buf)[: info.nbytes])
                with lock:
                    free.append(buf)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(work, nxt)))
    writer.close()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json(plans)))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return writer.sha256


def compare(out: Path, other: Path) -> None:
    a, b = Checkpoint.open(out), Checkpoint.open(other)
    differ = total = 0
    for name, ia in a.tensors.items():
        ib = b.tensors[name]
        ra, rb = ShardReader(ia.shard), ShardReader(ib.shard)
        x = np.frombuffer(ra.view(ia), dtype=np.uint16)
        y = np.frombuffer(rb.view(ib), dtype=np.uint16)
        differ += int(np.count_nonzero(x != y))
        total += x.size
    print(f"elements differing from {other}: {differ} of {total} ({differ / total:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--compare", type=Path, help="a switchyard merge of the same inputs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    digests = merge(args.base, args.adapter, args.out)
    print(f"merged in {time.perf_counter() - t0:.2f} s (after start-up); sha256 {json.dumps(digests)}")
    assert "torch" not in sys.modules, "this bound must run without torch"
    if args.compare:
        compare(args.out, args.compare)


if __name__ == "__main__":
    main()
