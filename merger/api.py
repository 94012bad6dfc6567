"""`merge(base, adapters, out, options)`: the merger's Python API (the CLI and the promote pipeline).

Everything is checked and planned before a byte is written; the output is written to a temporary
folder beside `out` and renamed into place only when complete, so a failure (bad input, NaN, disk
full, Ctrl-C) leaves `out` as it was.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from merger.core import fast
from merger.core.combine import METHODS
from merger.core.plan import PlanOptions, build_plan, step_tensors
from merger.errors import InputError, OutputError
from merger.io.adapter import load_adapter, sha256_file
from merger.io.checkpoint import Checkpoint
from merger.io.early import EarlyBase, EarlyFiles
from merger.io.writer import StreamingShardWriter, index_json, parse_size, plan_shards, OutTensor
from merger import provenance
from switchyard.files import replace_dir

_SKIP = {"model.safetensors.index.json", "README.md", "switchyard.json"}
_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class MergeOptions:
    dtype: str = "auto"
    combine: str = "sequential"
    weights: Optional[tuple[float, ...]] = None
    density: float = 0.5
    seed: int = 0
    qlora_base: str = "original"
    shard_size: str = "2GB"
    device: str = "cpu"
    precise: bool = False  # deltas in float64 instead of float32
    force: bool = False
    allow_pickle: bool = False
    workers: int = 2

    def check(self, n_adapters: int) -> None:
        if self.dtype not in _DTYPES:
            raise InputError(f"--dtype {self.dtype} is not one of {', '.join(_DTYPES)}", "pick one of them")
        if self.combine not in METHODS:
            raise InputError(f"--combine {self.combine} is not one of {', '.join(METHODS)}", "pick one of them")
        if self.qlora_base not in ("original", "nf4"):
            raise InputError(f"--qlora-base {self.qlora_base} is not original or nf4", "pick one of them")
        if self.weights is not None and len(self.weights) != n_adapters:
            raise InputError(f"--weights has {len(self.weights)} values for {n_adapters} adapters",
                             "give one weight per adapter, e.g. --weights 0.7,0.3")
        if not 0 < self.density <= 1:
            raise InputError(f"--density {self.density} is outside (0, 1]", "use e.g. --density 0.5")
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"--device {self.device} is not cpu or cuda", "pick one of them")


@dataclass(frozen=True)
class MergeResult:
    out: Path
    provenance: dict
    rounding: dict
    tensors_merged: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def default_out_name(base: Path, adapter_name: str, adapter_sha: str, dtype: str) -> str:
    return f"merged-{base.name}-{adapter_name}-{adapter_sha[:8]}-{dtype}"


def merge(base: Path, adapters: list[Path], out: Optional[Path], options: MergeOptions = MergeOptions(),
          progress: Optional[Callable[[str, int, int], None]] = None, early: Optional[EarlyBase] = None,
          early_files: Optional[EarlyFiles] = None) -> MergeResult:
    """Merge `adapters` into `base`, writing a standard checkpoint to `out` (None: the default name
    beside the base). `progress(name, done_bytes, total_bytes)` is called after each tensor.
    `early`: the base's read-ahead, started by the caller before it imported torch (else started here);
    `early_files`: the adapters' weights hashed ahead, likewise (else hashed when loaded)."""
    try:
        return _merge(Path(base), adapters, out, options, progress, early, early_files)
    finally:
        if early is not None:
            early.stop()  # a no-op once finished; ends its thread after an error


def _merge(base: Path, adapters: list[Path], out: Optional[Path], options: MergeOptions,
           progress: Optional[Callable[[str, int, int], None]], early: Optional[EarlyBase],
           early_files: Optional[EarlyFiles] = None) -> MergeResult:
    start, t0 = datetime.now(timezone.utc), time.perf_counter()
    _return_freed_memory()
    if not adapters:
        raise InputError("no adapter given", "pass at least one PEFT adapter folder")
    options.check(len(adapters))
    if options.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda but torch sees no CUDA GPU", "use --device cpu")
    ckpt = Checkpoint.open(base)
    config_path = base / "config.json"
    base_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    kernel = _torch_free_kernel(options, len(adapters))
    loaded = plan = None
    if kernel is not None:  # the common case, without torch (merger/core/fast.py), if the plan allows
        loaded = _load_adapters(adapters, options, "numpy", early_files)
        plan = _plan(ckpt, base_config, loaded, options) if loaded is not None else None
        if plan is not None and not all(fast.eligible(t) for t in plan.tasks):
            plan = None
    if plan is None:  # the torch path
        kernel = None
        loaded = _load_adapters(adapters, options, "torch", early_files)
        plan = _plan(ckpt, base_config, loaded, options)
    if out is None:
        label = options.dtype if options.dtype != "auto" else "auto"
        out = base.parent / default_out_name(base, loaded[0].parsed.name, loaded[0].sha256, label)
    out = Path(out)
    if out.exists() and not options.force:
        raise OutputError(f"output folder {out} already exists", "pass --force to replace it, or choose another --out")
    shards = plan_shards([OutTensor(t.name, t.out_dtype, t.shape) for t in plan.tasks], parse_size(options.shard_size))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    own = early is None or early.paths != [s.path for s in ckpt.shards]
    if own:
        early = EarlyBase.start(base, ckpt)
    try:
        cached, commit = early.cached, early.commit
        ordered = _ordered_pass(kernel)
        writer = StreamingShardWriter(tmp, shards, hashing=ordered is None)
        total = sum(ckpt.tensors[t.source].nbytes for t in plan.tasks)
        done = [0]

        def on_tensor(task, nbytes):
            done[0] += nbytes
            early.advance(done[0])
            if progress:
                progress(task.name, done[0], total)

        from merger.executor import execute

        if kernel is None:
            import torch

            compute = torch.float64 if options.precise else torch.float32
        else:
            compute = None  # the torch-free path
        mapped = [l.pages for l in loaded if l.pages is not None]

        def release(task):  # the adapter pages a written tensor read: a module's worth at a time
            tensors = [t for step in task.steps for t in step_tensors(step)]
            for pages in mapped:
                pages.release(tensors)

        kernel_state, kernel_note = _kernel_state(plan, options)
        if ordered is not None:
            from merger import ordered as ordered_pass

            result = ordered_pass.execute(ckpt, plan, writer, kernel=kernel, in_turn=ordered[0], sha=ordered[1], fused=ordered[2],
                                          workers=options.workers, on_tensor=on_tensor, release=release)
        else:
            result = execute(ckpt, plan, writer, compute=compute, device=options.device, workers=options.workers,
                             on_tensor=on_tensor, release=release, kernel=kernel)
        base_hashes = early.result()  # the cached ones, plus those hashed during this merge
        if early.hashing:
            provenance.remember_hashes({p: base_hashes[p.name] for p in early.paths if p.name not in cached})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json(shards), indent=2))
        _copy_side_files(base, tmp, base_config, plan, options)
        rounding = provenance.rounding_summary(result.stats, options.dtype)
        end = datetime.now(timezone.utc)
        peak = provenance.peak_rss_bytes()
        prov = {
            "schema": provenance.SCHEMA,
            "base": {"path": str(base.resolve()), "hub_commit": commit,
                     "shards_sha256": None if commit else base_hashes},
            "adapters": [{"name": l.parsed.name, "path": str(l.path.resolve()), "weights": l.weights_file.name,
                          "sha256": l.sha256, "config": l.raw_config} for l in loaded],
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()
                        if k not in ("force",)},
            "versions": provenance.library_versions(),
            "started": start.isoformat(), "finished": end.isoformat(),
            "output": {"path": str(out.resolve()), "shards_sha256": result.output_sha256,
                       "bytes": sum(s.size for s in shards), "tie_word_embeddings_changed": plan.untied},
            "rounding": rounding,
            "notes": list(plan.notes),
            "validation": None,
            "resources": {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak, "native_kernel": kernel_state,
                          "torch": "not used (torch-free path, merger/core/fast.py)" if kernel is not None else "used",
                          "output_sha256": "by the merge workers, chunk by chunk (merger/ordered.py)"
                          if ordered is not None else "by the writer's hash thread"},
        }
        (tmp / "switchyard.json").write_text(json.dumps(prov, indent=2))
        (tmp / "README.md").write_text(provenance.model_card(prov))
        _rename_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if own:
            early.stop()
    return MergeResult(out, prov, rounding, len(result.stats), result.bytes_written,
                       time.perf_counter() - t0, peak, plan.notes + ((kernel_note,) if kernel_note else ()))


def _torch_free_kernel(options: MergeOptions, n_adapters: int):
    """merger/native's kernel when the torch-free path may apply (it still needs an eligible plan),
    else None. SWITCHYARD_TORCH_FREE=0 turns the path off."""
    if os.environ.get("SWITCHYARD_TORCH_FREE", "1") == "0" or n_adapters != 1 or options.device != "cpu" \
            or options.precise or options.qlora_base != "original":
        return None
    from merger import native

    return native.merge_lora_bf16() if native.enabled() else None


def _ordered_pass(kernel):
    """(hash_in_turn, libcrypto's SHA-256, merge_lora_bf16_in_turn or None) when the torch-free path can
    hash in its workers (merger/ordered.py), else None: the writer hashes. SWITCHYARD_ORDERED=0 turns it off."""
    if kernel is None or os.environ.get("SWITCHYARD_ORDERED", "1") == "0":
        return None
    from merger import native
    from merger.io import sha256_ctx

    in_turn, sha = native.hash_in_turn(), sha256_ctx.load()
    fused = native.merge_lora_bf16_in_turn() if kernel is native.merge_lora_bf16() else None
    return (in_turn, sha, fused) if in_turn is not None and sha is not None else None


def _load_adapters(adapters: list, options: MergeOptions, arrays: str, early_files: Optional[EarlyFiles] = None):
    """The adapters as torch tensors, or numpy arrays (None if one cannot be viewed so)."""
    sha256 = early_files.sha256 if early_files is not None else sha256_file
    loaded = [load_adapter(Path(a), options.allow_pickle, arrays, sha256) for a in adapters]
    if any(l is None for l in loaded):
        return None
    names = [l.parsed.name for l in loaded]
    if len(set(names)) != len(names):  # names key the plan's steps and the provenance
        loaded = [replace(l, parsed=replace(l.parsed, name=f"{i}-{l.parsed.name}")) for i, l in enumerate(loaded)]
    return loaded


def _plan(ckpt: Checkpoint, base_config: dict, loaded: list, options: MergeOptions):
    return build_plan(ckpt.tensors, base_config, [l.parsed for l in loaded],
                      PlanOptions(options.dtype, options.combine, options.weights, options.density,
                                  options.seed, options.qlora_base))


def _kernel_state(plan, options: MergeOptions) -> tuple[str, Optional[str]]:
    """Whether the bf16 merge loop runs in merger/native's C kernel: (state for the provenance, a note
    for the user when it could have and could not)."""
    from merger import native

    wanted = options.device == "cpu" and not options.precise and any(
        t.steps and t.src_dtype == t.out_dtype == "BF16" for t in plan.tasks)
    if not wanted:
        return "not used (no bfloat16 tensor merged on CPU in float32)", None
    if not native.enabled():
        return "off (SWITCHYARD_NATIVE=0)", None
    if native.merge_lora_bf16() is None:
        return f"unavailable: {native.last_error}", (
            f"the merge's C kernel could not be built ({native.last_error}); the torch loop ran instead: "
            "same output, about 25% slower (install a C compiler such as gcc, or set CC)")
    return "used", None


def _return_freed_memory() -> None:
    """Make glibc serve every large tensor from its own mmap, returned to the OS when freed.

    By default glibc raises its mmap threshold after the first large free, and later tensors then
    come from heap arenas that never shrink, which would let resident memory creep up to the sum
    of all tensors seen instead of the ones alive.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed at 1 MiB
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _copy_side_files(base: Path, tmp: Path, base_config: dict, plan, options: MergeOptions) -> None:
    """Config (tie flag and dtype made true to the output), generation config, tokenizer files."""
    for f in base.iterdir():
        if f.is_file() and f.name not in _SKIP and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(f, tmp / f.name)
    if base_config:
        config = dict(base_config)
        if plan.tie_word_embeddings is not None:
            config["tie_word_embeddings"] = plan.tie_word_embeddings
            if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
                config["text_config"] = {**config["text_config"], "tie_word_embeddings": plan.tie_word_embeddings}
        if options.dtype != "auto":
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "dtype":
                    config[key] = options.dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _rename_into_place(tmp: Path, out: Path) -> None:
    try:
        replace_dir(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot move the merged model to {out}: {exc.strerror}", "check --out") from exc


def parse_weights(text: Optional[str]) -> Optional[tuple[float, ...]]:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise InputError(f"--weights {text!r} is not a comma-separated list of numbers",
                                      "e.g. --weights 0.7,0.3") from exc
