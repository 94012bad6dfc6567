"""Served accuracy of the demo via vLLM: base and each adapter on each adapter's eval set (chat, greedy).

    .venv/bin/python -m demo.checks.served artifacts/demo      # starts one engine (~1 min), stops it
"""
import sys, time, httpx
from pathlib import Path
from deploy.engines import Engine, EngineLaunch, free_port
from switchyard.config import load_config
from demo.evaluate import read_eval, exact_match, chat_messages
cfg = load_config(Path(sys.argv[1]) / "switchyard.toml")
t = time.time()
e = Engine(EngineLaunch(model=cfg.base.model, served_name=cfg.base.name, port=free_port(), enable_lora=True,
    max_lora_rank=cfg.engine.max_lora_rank, max_loras=cfg.engine.max_loras,
    lora_modules=tuple((a.name, a.path) for a in cfg.adapters), max_model_len=cfg.engine.max_model_len,
    kv_cache_gib=cfg.engine.kv_cache_gib, dtype=cfg.engine.dtype, log_path=Path(sys.argv[1]).resolve().parent / "demo-served-check.log"))
try:
    e.start(timeout_s=600)
    print("started in", round(time.time() - t), "s", flush=True)
    from concurrent.futures import ThreadPoolExecutor
    with httpx.Client(timeout=120) as c:
        def ask(model, item):
            r = c.post(e.url + "/v1/chat/completions", json={"model": model, "messages": chat_messages(item), "max_tokens": 32, "temperature": 0})
            r.raise_for_status(); return r.json()["choices"][0]["message"]["content"]
        for a in cfg.adapters:
            items = read_eval(a.eval)
            for model in (cfg.base.name, a.name):
                with ThreadPoolExecutor(16) as ex:
                    outs = list(ex.map(lambda i: ask(model, i), items))
                print(a.name, "eval; model", model, "acc", exact_match(outs, [i.expected for i in items]), repr(outs[0]), flush=True)
        r = c.post(e.url + "/v1/completions", json={"model": cfg.base.name, "prompt": "the red fox", "max_tokens": 12, "temperature": 0})
        print("completion:", repr(r.json()["choices"][0]["text"]))
finally:
    e.stop()
