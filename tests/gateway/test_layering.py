"""The pure core stays pure: no network, web framework, event loop or process imports."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway.core

FORBIDDEN = {"httpx", "aiohttp", "fastapi", "starlette", "uvicorn", "asyncio", "subprocess", "socket", "os"}


def test_core_imports_nothing_from_the_edges():
    core = Path(gateway.core.__file__).parent
    found = {}
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = {n.split(".")[0] for n in names} & FORBIDDEN
            if bad:
                found[path.name] = sorted(bad)
    assert len(list(core.glob("*.py"))) >= 6
    assert found == {}
