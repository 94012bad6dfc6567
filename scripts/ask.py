"""Send a few eval prompts to each model through the gateway with the official OpenAI client, and show
the answers, whether they are right, and which mode served them (the x-switchyard-mode header)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openai import OpenAI

from switchyard.config import load_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--url", default=None)
    p.add_argument("-n", type=int, default=3, help="prompts per model")
    args = p.parse_args()
    cfg = load_config(args.config)
    url = args.url or f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    for spec in cfg.adapters:
        rows = [json.loads(line) for line in Path(spec.eval).read_text().splitlines()[: args.n]]
        for row in rows:
            raw = client.chat.completions.with_raw_response.create(
                model=spec.name, messages=[{"role": "user", "content": row["prompt"]}], max_tokens=32, temperature=0)
            answer = raw.parse().choices[0].message.content.strip()
            mark = "✓" if answer == row["expected"].strip() else "✗"
            mode = raw.headers.get("x-switchyard-mode")
            print(f"  {spec.name:<14} [{mode:<7}] {row['prompt']!r:<40} -> {answer!r} {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
