"""Metrics of `poegpt serve`: a small Prometheus registry and every metric the server records.

`Metrics` holds counters, gauges and histograms with labels and writes Prometheus's text exposition
(format 0.0.4) by hand, so serving needs no client library. The metric names live here in one
place: the engine's (`register_engine_metrics`, `record_report`) and the HTTP side's
(`register_http_metrics`, `CountRequests`), so /metrics and docs/serving.md's table can be read
against one file.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Metrics:
    """Counters, gauges and histograms with labels, rendered as Prometheus text. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._families: dict[str, dict] = {}

    def _family(self, name, kind, help, buckets=None):
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = {"kind": kind, "help": help, "buckets": buckets, "samples": {}, "fn": None}
        return fam

    def counter(self, name: str, help: str) -> None:
        with self._lock:
            self._family(name, "counter", help)

    def histogram(self, name: str, help: str, buckets=LATENCY_BUCKETS) -> None:
        with self._lock:
            self._family(name, "histogram", help, tuple(buckets))

    def gauge(self, name: str, help: str, fn: Callable[[], float | dict]) -> None:
        """A gauge read at scrape time: fn() returns a number, or {(label pairs): number}."""
        with self._lock:
            self._family(name, "gauge", help)["fn"] = fn

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            s = self._families[name]["samples"]
            s[key] = s.get(key, 0) + value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            fam = self._families[name]
            h = fam["samples"].get(key)
            if h is None:
                h = fam["samples"][key] = {"counts": [0] * len(fam["buckets"]), "sum": 0.0, "count": 0}
            for i, b in enumerate(fam["buckets"]):
                if value <= b:
                    h["counts"][i] += 1
            h["sum"] += value
            h["count"] += 1

    def value(self, name: str, **labels) -> float:
        """A counter's value (0 when never incremented); for tests and the benchmark."""
        with self._lock:
            return self._families[name]["samples"].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        out = []
        with self._lock:
            for name, fam in self._families.items():
                out.append(f"# HELP {name} {fam['help']}")
                out.append(f"# TYPE {name} {fam['kind']}")
                if fam["kind"] == "gauge":
                    v = fam["fn"]()
                    items = v.items() if isinstance(v, dict) else [((), v)]
                    out += [f"{name}{_labels(k)} {_number(x)}" for k, x in items]
                elif fam["kind"] == "counter":
                    out += [f"{name}{_labels(k)} {_number(x)}" for k, x in sorted(fam["samples"].items())]
                else:
                    for k, h in sorted(fam["samples"].items(), key=lambda kv: kv[0]):
                        for b, c in zip(fam["buckets"], h["counts"]):
                            out.append(f"{name}_bucket{_labels(k + (('le', _number(b)),))} {c}")
                        out.append(f"{name}_bucket{_labels(k + (('le', '+Inf'),))} {h['count']}")
                        out.append(f"{name}_sum{_labels(k)} {_number(h['sum'])}")
                        out.append(f"{name}_count{_labels(k)} {h['count']}")
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# the engine's metrics
# ------------------------------------------------------------------------------------------------

def register_engine_metrics(m: Metrics, scheduler) -> None:
    m.counter("poegpt_generation_tokens_total", "Tokens generated, by PoE mode.")
    m.counter("poegpt_sequences_finished_total", "Sequences (prompt x choice) finished, by mode and reason.")
    m.counter("poegpt_decode_steps_total", "Batched decode steps of the static modes.")
    m.counter("poegpt_speculative_drafted_tokens_total", "Draft tokens proposed by self-speculative decoding.")
    m.counter("poegpt_speculative_accepted_tokens_total", "Draft tokens the verifier accepted.")
    m.counter("poegpt_wand_exit_stage_total", "WAND tokens by the stage that emitted them.")
    m.histogram("poegpt_time_to_first_token_seconds", "From submission to the first generated token.")
    m.histogram("poegpt_queue_wait_seconds", "From submission to admission into the running batch.")
    m.histogram("poegpt_time_per_output_token_seconds", "Mean time between tokens of a finished sequence.")
    m.histogram("poegpt_decode_batch_size", "Rows in each batched decode step.", BATCH_BUCKETS)
    m.gauge("poegpt_queue_depth", "Requests waiting for a slot.", lambda: scheduler.queue_depth)
    m.gauge("poegpt_running_sequences", "Sequences being generated (rows of the running batch).",
            lambda: scheduler.running())
    m.gauge("poegpt_max_batch", "Sequences that may run at once (--max-batch).", lambda: scheduler.max_batch)
    m.gauge("poegpt_max_queue", "Requests that may wait (--max-queue).", lambda: scheduler.max_queue)


def record_report(m: Metrics, report: dict) -> None:
    """The counters read from what a finished sequence's mode reported (the mode table's
    per-sequence report): draft tokens proposed and accepted, and the stage that emitted each token."""
    if "drafted" in report:
        m.inc("poegpt_speculative_drafted_tokens_total", report["drafted"])
        m.inc("poegpt_speculative_accepted_tokens_total", report["accepted"])
    for stage in report.get("stages_used", ()):
        m.inc("poegpt_wand_exit_stage_total", stage=str(stage))


# ------------------------------------------------------------------------------------------------
# the HTTP side's metrics
# ------------------------------------------------------------------------------------------------

def register_http_metrics(m: Metrics) -> None:
    m.counter("poegpt_http_requests_total", "HTTP requests, by route and status code.")
    m.counter("poegpt_requests_total", "Accepted completion requests, by PoE mode.")
    m.counter("poegpt_prompt_tokens_total", "Prompt tokens of accepted completion requests.")
    m.histogram("poegpt_request_latency_seconds", "End-to-end latency of completion requests, by PoE mode.")


class CountRequests:
    """ASGI middleware counting HTTP requests by route and status. Plain ASGI rather than
    BaseHTTPMiddleware, which would get in the way of streaming and of disconnect detection."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.inc("poegpt_http_requests_total", route=path if path in self.routes else "other",
                             code=str(status[0]))
