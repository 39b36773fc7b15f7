"""Serving throughput and latency of `poegpt serve` over loopback, continuous batching on vs off.

By default it starts two `poegpt serve` processes on free loopback ports on the same model (the
shipped demo model unless --model): one batching (`--max-batch 16`), one not (`--max-batch 1`, every
request waits for the one running before it). Then for each PoE mode (full and speculative by
default: full, speculative and WAND) and each concurrency level (1, 4, 16), that many client threads send streaming
/v1/completions requests back to back, first to the batching server and right after to the other,
so that each on/off pair is measured side by side under the same machine load.

Per cell: requests, generated tokens, wall time, tokens/s over all clients, time to first token
(TTFT) p50/p99, inter-token latency (ITL: the gap between consecutive chunks that carry tokens,
pooled over all requests, as vLLM's serving benchmark counts it; a speculative chunk may carry
several tokens) p50/p99, end-to-end latency p50/p99, and the mean rows per batched decode step read
from the server's /metrics. Then the on/off ratios, each mode's throughput against full mode's on
the same server at the same concurrency (every mode runs in the one continuous batch), and one
JSON line.

Bounded: at most --requests per cell (default max(8, 2 x concurrency)) and --cell-seconds per cell
(no new request starts after that; those running finish), greedy, --max-tokens new tokens each.

    python bench/serve.py                                   # the matrix on the demo model
    python bench/serve.py --model runs/demo/run --modes full prefix --mode-fields '{"prefix": {"max_stages": 2}}'
    python bench/serve.py --url http://127.0.0.1:8000       # one running server: no on/off ratio
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe, measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    """One streaming request: TTFT, the gaps between token-carrying chunks, latency, tokens (also used
    by bench/vllm_serve.py)."""
    t0 = time.perf_counter()
    times, tokens = [], 0
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
            choice = chunk["choices"][0] if chunk["choices"] else {}
            # a chunk with tokens: token_ids when asked for (return_token_ids), else some text (vLLM sends
            # "token_ids": null when not asked; bench/vllm_serve.py)
            ids = choice.get("token_ids")
            if ids or (ids is None and choice.get("text")):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": times[0] - t0 if times else latency, "tokens": tokens,
            "itl": [b - a for a, b in zip(times, times[1:])]}


def drive(url: str, concurrency: int, n_requests: int, body_for, seconds: float = float("inf")) -> dict:
    """`concurrency` client threads send streaming requests `body_for(i)`, i < n_requests, until all are
    sent or `seconds` have passed; returns throughput and TTFT / inter-token / latency percentiles."""
    results, errors = [], []
    lock = threading.Lock()
    counter = iter(range(n_requests))
    stop_at = time.perf_counter() + seconds

    def worker():
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None or time.perf_counter() > stop_at:
                    return
                try:
                    r = one_request(c, body_for(i))
                except Exception as e:  # reported, not fatal: the table shows how many failed
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "tokens": tokens, "seconds": wall,
            "tok_s": tokens / wall, "req_s": len(results) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "latency_p50": percentile(lat, 50), "latency_p90": percentile(lat, 90),
            "latency_p99": percentile(lat, 99)}


def run_cell(url: str, name: str, concurrency: int, n_requests: int, seconds: float, body_extra: dict,
             a) -> dict:
    def body_for(i: int) -> dict:
        return {"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": a.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True, **body_extra}

    with httpx.Client(base_url=url, timeout=60) as c:
        before = scrape(c)
        result = drive(url, concurrency, n_requests, body_for, seconds)
        after = scrape(c)
    steps = after.get("poegpt_decode_batch_size_count", 0) - before.get("poegpt_decode_batch_size_count", 0)
    rows = after.get("poegpt_decode_batch_size_sum", 0) - before.get("poegpt_decode_batch_size_sum", 0)
    return {**result, "mean_batch_rows": rows / steps if steps else float("nan")}


def launch(model: str | None, max_batch: int, threads: int | None, dtype: str = "auto") -> tuple[subprocess.Popen, str]:
    """`poegpt serve` on a free loopback port; returns once /health answers 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "poegpt.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "256", "--log-level", "warning"]
    cmd += ["--model", model] if model else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--dtype", dtype]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"poegpt serve exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("poegpt serve did not start within 120 s")
        time.sleep(0.2)


def finite(x):
    """NaN (no data) as null, so that the JSON line is strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def rows_per_step(r: dict) -> str:
    """Mean rows per batched decode step; '-' when none ran."""
    x = r["mean_batch_rows"]
    return f"{x:.2f}" if x == x else "-"


def fmt_ms(x: float) -> str:
    return f"{1000 * x:.0f}" if x == x else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="bench this running `poegpt serve` instead of launching two")
    ap.add_argument("--model", help="checkpoint for the launched servers (default: the shipped demo model)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the launched servers' --dtype (default auto: bf16 where the CPU has it natively, else fp32)")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[16, 1],
                    help="launch one server per value; the first is 'on', the last 'off' (default 16 1)")
    ap.add_argument("--threads", type=int, default=None, help="the launched servers' --threads")
    ap.add_argument("--served-name", help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--modes", nargs="+", default=["full", "speculative", "wand"])
    ap.add_argument("--mode-fields", default="{}", help='PoE fields per mode as JSON, e.g. \'{"prefix": {"max_stages": 2}}\'')
    ap.add_argument("--requests", type=int, default=None, help="requests per cell (default: max(8, 2 x concurrency))")
    ap.add_argument("--cell-seconds", type=float, default=60.0, help="no new request starts after this, per cell")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    mode_fields = json.loads(a.mode_fields)
    procs, servers = [], []
    load_before = os.getloadavg()
    try:
        if a.url:
            servers.append(("given", a.url))
        else:
            for mb in a.max_batch:
                proc, url = launch(a.model, mb, a.threads, a.dtype)
                procs.append(proc)
                servers.append((f"max-batch {mb}", url))
        with httpx.Client(base_url=servers[0][1], timeout=30) as c:
            card = c.get("/v1/models").json()["data"][0]
        name = a.served_name or card["id"]
        cells = []
        for mode in a.modes:
            extra = {"poe_mode": mode, **mode_fields.get(mode, {})}
            for label, url in servers:         # warm-up: first requests pay for lazy initialisation
                run_cell(url, name, 1, 2, a.cell_seconds, extra, a)
            for k in a.concurrency:
                for label, url in servers:     # side by side: the same cell on each server in turn
                    r = run_cell(url, name, k, a.requests or max(8, 2 * k), a.cell_seconds, extra, a)
                    cells.append({"mode": mode, "server": label, **r})
                    print(f"  {mode:<12} {label:<13} concurrency {k:>3}: {r['tok_s']:7.1f} tok/s", file=sys.stderr,
                          flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    load_after = os.getloadavg()
    print(f"model: {name} ({card['poe']['n_layer']} layers, {card['poe']['n_stages']} stages, context "
          f"{card['max_model_len']}); greedy, {a.max_tokens} new tokens per request, streaming over loopback; "
          f"machine load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs); "
          f"servers' dtype {a.dtype}")
    machine = measure(flops=False, bw=False)
    print(describe(machine))
    print(f"{'mode':<12}{'server':<14}{'conc':>5}{'reqs':>5}{'err':>4}{'tokens':>7}{'sec':>7}{'tok/s':>8}"
          f"{'TTFT p50':>9}{'p99':>6}{'ITL p50':>8}{'p99':>6}{'lat p50':>8}{'p99':>7}{'rows/step':>10}   (times in ms)")
    for r in cells:
        print(f"{r['mode']:<12}{r['server']:<14}{r['concurrency']:>5}{r['requests']:>5}{r['errors']:>4}"
              f"{r['tokens']:>7}{r['seconds']:>7.1f}{r['tok_s']:>8.1f}{fmt_ms(r['ttft_p50']):>9}"
              f"{fmt_ms(r['ttft_p99']):>6}{fmt_ms(r['itl_p50']):>8}{fmt_ms(r['itl_p99']):>6}"
              f"{fmt_ms(r['latency_p50']):>8}{fmt_ms(r['latency_p99']):>7}{rows_per_step(r):>10}")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    ratios = []
    if len(servers) > 1:
        on, off = servers[0][0], servers[-1][0]
        print(f"\nratios {on} / {off} (same mode and concurrency, measured back to back)")
        print(f"{'mode':<12}{'conc':>5}{'tok/s':>8}{'TTFT p50':>10}{'ITL p50':>9}{'lat p50':>9}")
        for mode in a.modes:
            for k in a.concurrency:
                x = next(c for c in cells if c["mode"] == mode and c["server"] == on and c["concurrency"] == k)
                y = next(c for c in cells if c["mode"] == mode and c["server"] == off and c["concurrency"] == k)
                q = {key: x[key] / y[key] if y[key] else float("nan")
                     for key in ("tok_s", "ttft_p50", "itl_p50", "latency_p50")}
                ratios.append({"mode": mode, "concurrency": k, **q})
                print(f"{mode:<12}{k:>5}{q['tok_s']:>8.2f}{q['ttft_p50']:>10.2f}{q['itl_p50']:>9.2f}"
                      f"{q['latency_p50']:>9.2f}")
    vs_full = []
    if "full" in a.modes and len(a.modes) > 1:
        print("\nthroughput against full mode (same server and concurrency)")
        print(f"{'mode':<12}{'server':<14}{'conc':>5}{'tok/s':>8}")
        for c in cells:
            f = next((x for x in cells if x["mode"] == "full" and x["server"] == c["server"]
                      and x["concurrency"] == c["concurrency"]), None)
            if c["mode"] != "full" and f is not None and f["tok_s"]:
                vs_full.append({"mode": c["mode"], "server": c["server"], "concurrency": c["concurrency"],
                                "tok_s": c["tok_s"] / f["tok_s"]})
                print(f"{c['mode']:<12}{c['server']:<14}{c['concurrency']:>5}{vs_full[-1]['tok_s']:>8.2f}")
    print(json.dumps(finite({"bench": "serve", "model": name, "max_tokens": a.max_tokens, "servers": [s[0] for s in servers],
                      "threads": a.threads, "load_avg_before": load_before, "load_avg_after": load_after,
                      "cpus": os.cpu_count(), "dtype": a.dtype, "machine": machine, "cells": cells,
                      "ratios_on_off": ratios, "ratios_vs_full": vs_full})))


if __name__ == "__main__":
    main()
