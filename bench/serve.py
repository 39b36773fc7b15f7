"""Serving throughput and latency of `poegpt serve` at concurrency 1 and 16, over loopback.

At each concurrency level, that many client threads send streaming /v1/completions requests back to
back (a fixed number of new tokens, greedy unless --temperature, prompts cycled from a multilingual
list, `stream_options.include_usage` for the token count). Per level: requests, generated tokens,
wall time, tokens/s over all clients, requests/s, end-to-end latency p50/p90/p99, time to first
token p50/p90, and the mean rows per batched decode step read from the server's /metrics (how much
continuous batching actually happened). Prints a table, then one JSON line.

    poegpt serve --model runs/demo/run --max-batch 16 &
    python bench/serve.py --url http://127.0.0.1:8000
    python bench/serve.py --launch runs/demo/run          # start `poegpt serve` on a free port, bench, stop it
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["The capital of France is", "대한민국의 수도는", "def fibonacci(n):", "In the beginning",
           "La capital de España es", "東京は日本の", "Once upon a time,", "import numpy as np\n"]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def scrape(client: httpx.Client) -> dict[str, float]:
    """The batch-size histogram's sum and count from /metrics."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        for key in ("poegpt_decode_batch_size_sum", "poegpt_decode_batch_size_count"):
            if line.startswith(key + " "):
                out[key] = float(line.split()[-1])
    return out


def one_request(client: httpx.Client, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def run_level(url: str, name: str, concurrency: int, n_requests: int, a) -> dict:
    results, errors = [], []
    lock = threading.Lock()
    counter = iter(range(n_requests))

    def worker():
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": a.max_tokens,
                        "temperature": a.temperature, "stream": True, "stream_options": {"include_usage": True},
                        "poe_mode": a.mode, **json.loads(a.mode_fields)}
                if a.temperature > 0:
                    body["seed"] = i
                try:
                    r = one_request(c, body)
                except Exception as e:  # reported, not fatal: the table shows how many failed
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    results.append(r)

    with httpx.Client(base_url=url, timeout=60) as c:
        before = scrape(c)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = scrape(c)
    steps = after.get("poegpt_decode_batch_size_count", 0) - before.get("poegpt_decode_batch_size_count", 0)
    rows = after.get("poegpt_decode_batch_size_sum", 0) - before.get("poegpt_decode_batch_size_sum", 0)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "tokens": tokens, "seconds": wall,
            "tok_s": tokens / wall, "req_s": len(results) / wall,
            "latency_p50": percentile(lat, 50), "latency_p90": percentile(lat, 90), "latency_p99": percentile(lat, 99),
            "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
            "mean_batch_rows": rows / steps if steps else float("nan")}


def launch(model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "poegpt.cli", "serve", "--model", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"poegpt serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit("poegpt serve did not start within 120 s")
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running `poegpt serve`")
    ap.add_argument("--launch", metavar="MODEL", help="start `poegpt serve --model MODEL` on a free port instead")
    ap.add_argument("--max-batch", type=int, default=16, help="with --launch: the server's --max-batch")
    ap.add_argument("--served-name", help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--mode", default="full", help="poe_mode of every request")
    ap.add_argument("--mode-fields", default="{}", help='extra PoE fields as JSON, e.g. \'{"max_stages": 2}\'')
    a = ap.parse_args()
    proc = None
    url = a.url
    if a.launch:
        proc, url = launch(a.launch, a.max_batch)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            card = c.get("/v1/models").json()["data"][0]
        name = a.served_name or card["id"]
        run_level(url, name, 1, 2, a)               # warm-up: first requests pay for lazy initialisation
        levels = [run_level(url, name, k, a.requests or max(8, 2 * k), a) for k in a.concurrency]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"server: {url}  model: {name} ({card['poe']['n_layer']} layers, {card['poe']['n_stages']} stages, "
          f"context {card['max_model_len']})  mode: {a.mode}  {a.max_tokens} new tokens per request, "
          f"temperature {a.temperature}")
    print(f"{'conc':>5}{'reqs':>6}{'err':>5}{'tokens':>8}{'sec':>8}{'tok/s':>9}{'req/s':>7}{'lat p50':>9}"
          f"{'p90':>7}{'p99':>7}{'ttft p50':>10}{'p90':>7}{'rows/step':>11}")
    for r in levels:
        print(f"{r['concurrency']:>5}{r['requests']:>6}{r['errors']:>5}{r['tokens']:>8}{r['seconds']:>8.2f}"
              f"{r['tok_s']:>9.1f}{r['req_s']:>7.2f}{r['latency_p50']:>9.3f}{r['latency_p90']:>7.3f}"
              f"{r['latency_p99']:>7.3f}{r['ttft_p50']:>10.3f}{r['ttft_p90']:>7.3f}{r['mean_batch_rows']:>11.2f}")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    speedup = levels[-1]["tok_s"] / levels[0]["tok_s"] if len(levels) > 1 and levels[0]["tok_s"] else None
    print(json.dumps({"bench": "serve", "url": url, "model": name, "mode": a.mode, "max_tokens": a.max_tokens,
                      "temperature": a.temperature, "levels": levels, "throughput_ratio_last_vs_first": speedup}))


if __name__ == "__main__":
    main()
