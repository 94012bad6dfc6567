"""Calibration and held-out text for `switchyard quantize`: the formats it accepts, and a built-in corpus.

`builtin.jsonl` (64 samples: short prose, code, and two-turn chats) and `heldout.jsonl` (12 samples,
none of which appear in the calibration file) were written for this project; nothing is downloaded.

Accepted JSONL lines, normalised by `parse_samples` into `{"text": ...}` or `{"messages": [...]}`:
    {"text": "..."}                                     plain text
    {"messages": [{"role": "user", "content": "..."}, ...]}   chat, rendered with the model's template
    {"prompt": "...", "expected": "..."}                an eval line: a user turn and the answer
    {"prompt": "..."}                                   a user turn alone
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

HERE = Path(__file__).resolve().parent
BUILTIN_CALIBRATION = HERE / "builtin.jsonl"
BUILTIN_HELDOUT = HERE / "heldout.jsonl"


class CalibrationFormatError(ValueError):
    """A line that is not one of the accepted shapes; the message names the line."""


def _normalise(obj: object, where: str) -> dict:
    if not isinstance(obj, dict):
        raise CalibrationFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    if isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in msgs):
            raise CalibrationFormatError(f"{where}: 'messages' must be a non-empty list of "
                                         "{'role': str, 'content': str}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
        if isinstance(obj.get("expected"), str):
            msgs.append({"role": "assistant", "content": obj["expected"]})
        return {"messages": msgs}
    raise CalibrationFormatError(f"{where}: expected a 'text', 'messages' or 'prompt' key, "
                                 f"got {sorted(obj)}")


def _json_lines(lines: Iterable[str], source: str) -> Iterator[tuple[str, object]]:
    """(`source:line`, parsed object) for each non-blank line. Raises CalibrationFormatError."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{source}:{number}", json.loads(line)
        except ValueError as exc:
            raise CalibrationFormatError(f"{source}:{number}: not JSON ({exc})") from exc


def parse_samples(lines: Iterable[str], source: str = "<lines>") -> list[dict]:
    """Normalised samples, in file order; blank lines are skipped. Raises CalibrationFormatError."""
    out = []
    for where, obj in _json_lines(lines, source):
        sample = _normalise(obj, where)
        if sample.get("text", "x").strip():  # an empty text calibrates nothing
            out.append(sample)
    return out


def load_samples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return parse_samples(f, str(path))


def parse_eval_items(lines: Iterable[str], source: str = "<lines>") -> list[dict]:
    """Eval lines `{"prompt", "expected"}` (both strings), in file order."""
    out = []
    for where, obj in _json_lines(lines, source):
        if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str)
                and isinstance(obj.get("expected"), str)):
            raise CalibrationFormatError(f"{where}: expected {{\"prompt\": str, \"expected\": str}}")
        out.append({"prompt": obj["prompt"], "expected": obj["expected"]})
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
