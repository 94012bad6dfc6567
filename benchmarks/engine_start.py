"""How long a vLLM engine takes to be ready (answers /health and generates a token), compiled or eager.

    .venv/bin/python benchmarks/engine_start.py CHECKPOINT [--rounds 2]

Starts CHECKPOINT (a plain, non-LoRA checkpoint such as a merged demo artifact) through
`deploy.engines.Engine`, as switchyard does, alternating vLLM's default (torch.compile with inductor for a
model without LoRA on CPU) and `--enforce-eager`, each start with an empty compile cache
(VLLM_CACHE_ROOT in a fresh temporary folder), and prints the time to ready of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()

    from deploy.engines import Engine, EngineLaunch, free_port

    for rnd in range(a.rounds):
        for extra in ((), ("--enforce-eager",)):
            work = Path(tempfile.mkdtemp(prefix="engine-start-"))
            os.environ["VLLM_CACHE_ROOT"] = str(work / "vllm-cache")  # the engine inherits it: a cold cache
            launch = EngineLaunch(model=a.checkpoint, served_name="m", port=free_port(), max_model_len=256,
                                  extra_args=extra, log_path=work / "engine.log")
            t = time.monotonic()
            engine = Engine(launch).start(timeout_s=900)
            ready = time.monotonic() - t
            engine.stop()
            print(f"round {rnd}  {' '.join(extra) or 'compiled (default)':20s} ready in {ready:.1f} s", flush=True)


if __name__ == "__main__":
    main()
