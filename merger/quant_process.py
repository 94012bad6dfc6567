"""Run one `merger/quant_worker.py` job in `.venv-quant` and turn its outcome into a result or one error.

The worker's stdout and stderr (llm-compressor's logs and progress bars) are appended to a log file
as they arrive; lines starting with `@@switchyard ` are events (see the worker's docstring). Memory
bound: one read chunk plus the current partial line; the log is never held in memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Callable

from merger.errors import MergeError
from merger.quant_worker import EXIT_REPORTED, parse_event

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "quant_worker.py"

# progress(kind, text): kind "stage" (a step began; text is for people) or "output" (one line of the
# quantizer's own output, progress bars included)
ProgressFn = Callable[[str, str], None]

# hints for the worker's error kinds: what the user can do next
HINTS = {
    "architecture": "llm-compressor's AWQ knows Llama, Mistral, Qwen, Gemma, Phi and similar decoder "
                    "models; serve this one unquantized (merged) or as an adapter",
    "tokenizer": "the model folder needs its tokenizer files (tokenizer.json, tokenizer_config.json)",
    "group_size": "pass a --group-size that divides every layer's input width, or add those layers to --ignore",
    "calibration_too_small": "pass more --samples, a longer --seq-len, or a larger --calibration file",
    "quantizer": "llm-compressor's own message is above",
    "memory": "quantize on a machine with more memory, or lower --samples / --seq-len",
}


class QuantizeError(MergeError):
    """`switchyard quantize` (or a quantized model's evaluation) could not run or failed."""


def quant_python(explicit: Path | None = None) -> Path:
    """`.venv-quant`'s interpreter: `explicit`, else $SWITCHYARD_QUANT_PYTHON, else `<repo>/.venv-quant`."""
    path = explicit or Path(os.environ.get("SWITCHYARD_QUANT_PYTHON", ROOT / ".venv-quant" / "bin" / "python"))
    if not Path(path).is_file():
        raise QuantizeError(f"the quantization environment is missing ({path} not found)",
                            "run `make setup`, which creates .venv-quant with llm-compressor")
    return Path(path)


_SPLIT = re.compile(rb"[\r\n]")


def run_worker(python: Path | None, request: dict, work: Path, log_path: Path,
               progress: ProgressFn | None = None, timeout_s: float | None = None) -> dict:
    """Run one job; return its `result` payload. Raises QuantizeError with one line and the log path."""
    exe = quant_python(python)
    req_path = work / f"request-{request['job']}.json"
    req_path.write_text(json.dumps(request, indent=1))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # .venv's packages must not leak into .venv-quant
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    result, error, tail = None, None, deque(maxlen=20)
    with open(log_path, "ab") as log:
        log.write(f"--- {request['job']}: {exe} {WORKER} {req_path}\n".encode())
        log.flush()
        proc = subprocess.Popen([str(exe), str(WORKER), str(req_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=work)
        pending = b""
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise QuantizeError(f"the quantizer ({request['job']}) ran past {timeout_s:.0f} s and was stopped",
                                        f"log: {log_path}")
                chunk = proc.stdout.read1(1 << 16)
                if not chunk:
                    break
                log.write(chunk)
                pieces = _SPLIT.split(pending + chunk)
                pending = pieces.pop()
                for raw in pieces:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    event = parse_event(line)
                    if event is None:
                        tail.append(line)
                        if progress:
                            progress("output", line)
                    elif event["event"] == "result":
                        result = event.get("result")
                    elif event["event"] == "error":
                        error = event
                    elif progress:
                        progress("stage", event.get("message", ""))
            if pending.strip():
                event = parse_event(pending.decode("utf-8", "replace"))
                result = event.get("result") if event and event["event"] == "result" else result
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if error is not None:
        kind = error.get("kind", "")
        hint = HINTS.get(kind, "")
        raise QuantizeError(error.get("message", "the quantizer failed"),
                            f"{hint}; log: {log_path}" if hint else f"log: {log_path}")
    if code != 0 or result is None:
        last = next((t for t in reversed(tail) if "Error" in t or "error" in t), tail[-1] if tail else "")
        why = "was killed (out of memory?)" if code in (-9, 137) else f"exited with code {code}"
        raise QuantizeError(f"the quantizer ({request['job']}) {why}: {last[:300]}", f"log: {log_path}")
    return result


__all__ = ["QuantizeError", "ProgressFn", "quant_python", "run_worker", "HINTS", "EXIT_REPORTED"]
