"""Continuous batching for `poegpt serve`: one engine thread runs every request (SPEC §10).

A request becomes sequences (one per prompt and choice) that wait in a bounded FIFO queue. One
engine thread owns the model and loops:

1. admit waiting sequences while fewer than `max_batch` are running;
2. start each admitted sequence. A static-mode one (full, prefix, stage, composition) is prefilled
   with the engine's `prefill` into a free row of a fixed-slot KV cache (max_batch rows x the model's
   context) and picks its first token. A WAND or self-speculative one gets its own batch-1 step
   iterator from `modes.mode_steps`, with its own cache;
3. advance every WAND / speculative sequence by one step (one token, or one verification pass);
4. run ONE decode step for all static rows together: each row feeds its last token at its own
   position (the cache keeps per-row lengths and the trunk takes per-row positions), the trunk runs
   to the deepest stage any row needs, and each row combines its own stages (`StageMix.logprobs`,
   rows with the same mix in one call) and samples with its own seeded generator (`engine.pick`).

A sequence that finishes leaves between steps and the last row of the batch moves into its row, so
the running rows are always rows 0..n-1 and the batch is a view of the cache (no copy per step).
New sequences join the running batch at the next step: that is the continuous batching.

A row computes exactly what the same request computes alone with `model.generate`: its prefill is
the same call on a one-row view of the cache, its decode attends only to its own keys (per-row
masks), rows never mix in the trunk, and its sampler is the same call on a generator with the same
seed. Layers deeper than a row's own mode needs may run for it when a deeper request shares the
step; their results are never read by that row.

Why WAND and speculative sequences run as their own batch-1 jobs: WAND exits each token at its own
stage and fills the skipped layers lazily, and speculative decoding drafts and verifies several
positions per pass and rolls its cache back; neither is one token per row per step. They run
interleaved with the batch (one step each per loop), so neither side waits for the other to finish.

Text is decoded here (`TextStream`): bytes of a character split across tokens are held back, and a
stop string ends its sequence as soon as it appears, so its row is freed at once. Events go back to
the caller (the server) through a callback. `Metrics` is the Prometheus registry that the scheduler
and the server record into; its text exposition is written by hand (no client library).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import new_cache
from .engine import Sampling, StageMix, pick, prefill
from .modes import ModeSpec, mode_steps

log = logging.getLogger("poegpt.serve")

FAILED = ("timeout", "error", "shutdown")    # finish reasons that end a request with an error


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down and takes no new work."""


# ------------------------------------------------------------------------------------------------
# metrics: a small Prometheus registry (text exposition format 0.0.4)
# ------------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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


def register_engine_metrics(m: Metrics, scheduler: "Scheduler") -> None:
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
    m.gauge("poegpt_running_sequences", "Sequences being generated: batched (static modes) or solo (WAND, speculative).",
            lambda: {(("kind", "batch"),): scheduler.running("batch"), (("kind", "solo"),): scheduler.running("solo")})
    m.gauge("poegpt_max_batch", "Sequences that may run at once (--max-batch).", lambda: scheduler.max_batch)
    m.gauge("poegpt_max_queue", "Requests that may wait (--max-queue).", lambda: scheduler.max_queue)


# ------------------------------------------------------------------------------------------------
# sequences and the events they emit
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeqParams:
    """What one sequence generates: a prompt's one choice."""
    prompt: tuple[int, ...]
    max_tokens: int
    spec: ModeSpec = ModeSpec()
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None        # top-N log-probs per generated token (None = off)
    prompt_logprobs: bool = False      # log-probs of the prompt's own tokens (echo with logprobs)


@dataclass
class TokenLogprob:
    token: str                          # the token's own text (one token may hold part of a character)
    logprob: float | None               # None for the first prompt token, which has no prediction
    top: dict[str, float] | None
    offset: int                         # where its text starts in the completion (or prompt) text


@dataclass
class Event:
    """What a sequence produced since its last event."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None    # stop | length | cancelled | timeout | error | shutdown
    error: str | None = None
    poe: dict | None = None             # what the mode did, on the last event


class TextStream:
    """Push-based detokenizer of one sequence: never splits a UTF-8 character, honours stop strings.

    push(token) returns (newly safe text, finish reason or None). The last len(longest stop) - 1
    characters are held back, since they may be the start of a stop string; a stop string is cut
    with everything after it. EOS ends the text (reason "stop"); finish() releases what was held."""

    def __init__(self, tokenizer, stop=(), eos_token_id: int | None = None):
        self.decoder = tokenizer.stream_decoder()
        self.stop = tuple(stop)
        self.eos = eos_token_id
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> tuple[str, str | None]:
        if token == self.eos:
            return self.finish(), "stop"
        start = max(0, len(self.text) - self.hold)      # an earlier stop string would have been found earlier
        self.text += self.decoder.push(token)
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta, self.text, self.sent = self.text[self.sent:cut], self.text[:cut], cut
            return delta, "stop"
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return "", None
        delta, self.sent = self.text[self.sent:safe], safe
        return delta, None

    def finish(self) -> str:
        # the bytes of a character cut off by the end are dropped rather than shown as U+FFFD (as the
        # CLI's generate does); invalid bytes inside the text were already replaced by the decoder
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class Sequence:
    """One prompt's one choice on its way through the scheduler."""

    def __init__(self, params: SeqParams, index: int = 0, on_event: Callable[[Event], None] | None = None,
                 group=None):
        self.params = params
        self.index = index
        self.on_event = on_event or (lambda event: None)
        self.group = group if group is not None else id(self)   # the request it belongs to (queue accounting)
        self.state = "new"                 # new -> waiting -> running -> done
        self.stop_reason: str | None = None  # set from other threads: cancelled | timeout
        self.finish_reason: str | None = None
        self.deadline: float | None = None
        self.tokens: list[int] = []
        self.submitted_at = self.started_at = self.first_token_at = self.finished_at = None
        self.stream: TextStream | None = None
        self.prompt_lp: list[TokenLogprob] | None = None
        # static modes: a row of the shared cache
        self.mix: StageMix | None = None
        self.generator: torch.Generator | None = None
        self.length = 0                    # tokens in its cache row
        self.pending: int | None = None    # the last token, fed at the next decode step
        # WAND / speculative: a step iterator of its own
        self.steps = None
        self.gen = None
        self.scorer: _Scorer | None = None

    @property
    def mode(self) -> str:
        return self.params.spec.mode


class _Scorer:
    """Full-PoE log-probs of a WAND / speculative sequence's tokens, by teacher forcing on a cache of
    its own: those modes target the full-PoE distribution, which they do not expose per token."""

    def __init__(self, model, prompt, max_tokens: int):
        self.model = model
        self.mix = StageMix.full(model.config.n_stages, model.config.poe_alpha)
        self.cache = new_cache(model, 1, len(prompt) + max_tokens)
        self.logp = self.mix.logprobs(model, prefill(model, self.cache, [list(prompt)], self.mix.depth))[0]

    def score(self, token: int) -> torch.Tensor:
        """The distribution `token` was chosen from; then advance past it."""
        logp = self.logp
        if self.cache.lengths[0] < self.cache.max_len:
            idx = torch.tensor([[token]], device=logp.device)
            hs = self.model.trunk(idx, self.mix.depth, self.cache)
            self.logp = self.mix.logprobs(self.model, [h[:, -1] for h in hs])[0]
        return logp


# ------------------------------------------------------------------------------------------------
# the scheduler
# ------------------------------------------------------------------------------------------------

class Scheduler:
    """Runs sequences on one engine thread with continuous batching (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, timeout: float | None = None,
                 metrics: Metrics | None = None, eos_token_id: int | None | str = "bos"):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.timeout = timeout if timeout and timeout > 0 else None
        # every training document starts with <|bos|>, so the model ends a text by predicting it
        self.eos_token_id = tokenizer.bos_id if eos_token_id == "bos" else eos_token_id
        self.device = model.rope_cos.device
        self.cache = new_cache(model, max_batch, model.config.sequence_len)
        self.batch: list[Sequence] = []    # static sequences; batch[i] owns cache row i
        self.solo: list[Sequence] = []     # WAND / speculative sequences
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._groups: collections.Counter = collections.Counter()   # request -> its sequences still waiting
        self._cv = threading.Condition()
        self._closed = False
        self.draining = False              # set by drain(): no new requests, the running ones go on
        self._thread: threading.Thread | None = None
        self._token_text = [token_text(tokenizer, i) for i in range(tokenizer.vocab_size)]
        self.metrics = metrics if metrics is not None else Metrics()
        register_engine_metrics(self.metrics, self)

    # --- the caller's side (any thread) ---------------------------------------------------------
    def start(self) -> "Scheduler":
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="poegpt-engine", daemon=True)
                self._thread.start()
        return self

    def close(self, wait: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def drain(self) -> None:
        """Take no new requests (submit raises SchedulerClosed) while the waiting and running ones go
        on to their end: the first half of a graceful shutdown. Only sets a flag, so that a signal
        handler may call it (the main thread may hold the lock when the signal arrives)."""
        self.draining = True

    def abort(self, reason: str = "shutdown") -> None:
        """End every waiting and running sequence now (the drain's time is up): each gets a last
        event with `reason` and its message, and running rows are freed before the next step."""
        with self._cv:
            self.cancel(list(self.waiting) + self.batch + self.solo, reason)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def running(self, kind: str | None = None) -> int:
        """Sequences being generated (`kind` batch or solo; both by default)."""
        rows = self.batch if kind == "batch" else self.solo if kind == "solo" else self.batch + self.solo
        return sum(s.state == "running" for s in rows)

    @property
    def queue_depth(self) -> int:
        """Requests with at least one sequence still waiting."""
        return len(self._groups)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request; QueueFull when max_queue requests already wait."""
        now = time.monotonic()
        with self._cv:
            if self._closed or self.draining:
                raise SchedulerClosed("the server is shutting down and takes no new requests; retry on another "
                                      "replica or later")
            if len(self._groups) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            for s in seqs:
                s.state, s.submitted_at = "waiting", now
                s.deadline = None if self.timeout is None else now + self.timeout
                self.waiting.append(s)
                self._groups[s.group] += 1
            self._cv.notify()

    def cancel(self, seqs, reason: str = "cancelled") -> None:
        """Stop sequences (a client went away): waiting ones leave the queue now, running ones free
        their row before the next step."""
        with self._cv:
            for s in seqs:
                if s.state == "waiting":
                    self.waiting.remove(s)
                    self._ungroup(s)
                    self._done(s, reason, error=self._message(reason))
                elif s.state == "running" and s.stop_reason is None:
                    s.stop_reason = reason
            self._cv.notify()

    def _ungroup(self, s: Sequence) -> None:
        self._groups[s.group] -= 1
        if self._groups[s.group] <= 0:
            del self._groups[s.group]

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self.waiting or self.batch or self.solo or self._closed):
                        self._cv.wait()
                    if self._closed:
                        break
                    now = time.monotonic()
                    for s in [s for s in self.waiting if s.deadline is not None and now > s.deadline]:
                        self.waiting.remove(s)
                        self._ungroup(s)
                        self._done(s, "timeout", error=self._message("timeout"))
                    admitted = []
                    while self.waiting and len(self.batch) + len(self.solo) + len(admitted) < self.max_batch:
                        s = self.waiting.popleft()
                        self._ungroup(s)
                        s.state = "running"
                        admitted.append(s)
                for s in self.batch + self.solo:
                    if s.stop_reason is None and s.deadline is not None and now > s.deadline:
                        s.stop_reason = "timeout"
                    if s.stop_reason is not None and s.state == "running":
                        self._done(s, s.stop_reason, error=self._message(s.stop_reason))
                try:
                    self._sweep()
                    for s in admitted:
                        self._start(s)
                    self._sweep()
                    self._step_solo()
                    self._step_batch()
                except Exception as e:    # a bug, not a bad request: fail what runs, keep serving
                    for s in admitted + self.batch + self.solo:
                        if s.state != "done":
                            self._fail(s, e)
                    self.batch, self.solo = [], []
        with self._cv:                    # shutting down: tell everyone still here
            for s in list(self.waiting) + self.batch + self.solo:
                if s.state != "done":
                    self._done(s, "shutdown", error=self._message("shutdown"))
            self.waiting.clear()
            self._groups.clear()

    def _message(self, reason: str) -> str | None:
        """The error a request ended with `reason` reports (None for a cancellation: nobody listens)."""
        if reason == "timeout":
            return f"the request did not finish within {self.timeout:g} s (the server's --timeout); ask for fewer tokens"
        if reason == "shutdown":
            return "the server is shutting down and stopped this request; retry on another replica or later"
        return None

    def _start(self, s: Sequence) -> None:
        p, model = s.params, self.model
        s.started_at = time.monotonic()
        self.metrics.observe("poegpt_queue_wait_seconds", s.started_at - s.submitted_at)
        s.stream = TextStream(self.tokenizer, p.stop, self.eos_token_id)
        try:
            if p.spec.entry.batched:
                s.mix = p.spec.stage_mix(model)
            if p.prompt_logprobs:
                s.prompt_lp = self._prompt_logprobs(s)
            if p.max_tokens == 0:
                self._send(s, Event(s.index), "length")
                return
            if not p.spec.entry.batched:
                s.steps, s.gen = mode_steps(model, [list(p.prompt)], p.spec, p.max_tokens, p.sampling,
                                            self.eos_token_id)
                if p.logprobs is not None:
                    s.scorer = _Scorer(model, p.prompt, p.max_tokens)
                self.solo.append(s)
                return
            s.generator = p.sampling.generator(self.device)
            row = len(self.batch)
            self.batch.append(s)
            # exactly decode_static's first step, on a one-row view of the shared cache
            hs = prefill(model, self.cache.rows(row, row + 1), [list(p.prompt)], s.mix.depth)
            s.length = len(p.prompt)
            logp = s.mix.logprobs(model, hs)
            self._emit(s, [int(pick(logp, p.sampling, s.generator))], [logp[0]])
        except Exception as e:   # one bad sequence must not take the engine down
            self._fail(s, e)

    def _step_solo(self) -> None:
        for s in list(self.solo):
            if s.state != "running":
                continue
            try:
                new = next(s.steps)[0]
            except StopIteration:
                self._send(s, Event(s.index, s.stream.finish()), "length")
                continue
            except Exception as e:
                self._fail(s, e)
                continue
            try:
                self._emit(s, new, None)
            except Exception as e:
                self._fail(s, e)
        self._sweep()

    def _step_batch(self) -> None:
        rows = list(self.batch)            # all running: finished rows were swept before this step
        if not rows:
            return
        n = len(rows)
        view = self.cache.rows(0, n, [s.length for s in rows])
        idx = torch.tensor([[s.pending] for s in rows], device=self.device)
        try:
            hs = self.model.trunk(idx, max(s.mix.depth for s in rows), view)
            for s in rows:
                s.length += 1
            groups: dict[StageMix, list[int]] = {}
            for r, s in enumerate(rows):
                groups.setdefault(s.mix, []).append(r)
            for mix, ix in groups.items():
                sel = torch.tensor(ix, device=self.device)
                logp = mix.logprobs(self.model, [h[sel, -1] for h in hs])
                for j, r in enumerate(ix):
                    s = rows[r]
                    self._emit(s, [int(pick(logp[j:j + 1], s.params.sampling, s.generator))], [logp[j]])
        except Exception as e:
            for s in rows:
                if s.state == "running":
                    self._fail(s, e)
        self.metrics.inc("poegpt_decode_steps_total")
        self.metrics.observe("poegpt_decode_batch_size", n)
        self._sweep()

    def _sweep(self) -> None:
        """Drop finished sequences; the batch's last row moves into each freed row."""
        for i in range(len(self.batch) - 1, -1, -1):
            if self.batch[i].state == "done":
                last = len(self.batch) - 1
                if i != last:
                    self.cache.move_row(last, i, self.batch[last].length)
                    self.batch[i] = self.batch[last]
                self.batch.pop()
        self.solo = [s for s in self.solo if s.state != "done"]


    # --- tokens out -----------------------------------------------------------------------------
    def _emit(self, s: Sequence, tokens: list[int], logps: list[torch.Tensor] | None) -> None:
        """Record new tokens of a running sequence and send them; finish it on EOS, stop or length."""
        p = s.params
        texts, entries, taken, reason = [], [] if p.logprobs is not None else None, [], None
        for i, t in enumerate(tokens):
            t = int(t)
            if entries is not None:
                lp = logps[i] if logps is not None else s.scorer.score(t)
                entries.append(self._entry(t, lp, p.logprobs, len(s.stream.text)))
            s.tokens.append(t)
            taken.append(t)
            delta, reason = s.stream.push(t)
            texts.append(delta)
            if reason is None and len(s.tokens) >= p.max_tokens:
                texts.append(s.stream.finish())
                reason = "length"
            if reason is not None:
                break
        s.pending = taken[-1] if taken else s.pending
        if s.first_token_at is None and taken:
            s.first_token_at = time.monotonic()
            self.metrics.observe("poegpt_time_to_first_token_seconds", s.first_token_at - s.submitted_at)
        self.metrics.inc("poegpt_generation_tokens_total", len(taken), mode=s.mode)
        self._send(s, Event(s.index, "".join(texts), taken, entries), reason)

    def _send(self, s: Sequence, event: Event, reason: str | None) -> None:
        if s.prompt_lp is not None:
            event.prompt_logprobs, s.prompt_lp = s.prompt_lp, None
        if reason is not None:
            self._done(s, reason, event=event)
        else:
            self._deliver(s, event)

    def _fail(self, s: Sequence, e: Exception) -> None:
        log.exception("sequence failed: %s", e)
        self._done(s, "error", error=f"internal error while generating: {type(e).__name__}: {e}")

    def _done(self, s: Sequence, reason: str, error: str | None = None, event: Event | None = None) -> None:
        """Finish a sequence: last event with the reason and what the mode did; free its resources."""
        if s.state == "done":
            return
        s.state, s.finish_reason, s.finished_at = "done", reason, time.monotonic()
        event = event or Event(s.index)
        event.finish_reason, event.error = reason, error
        if s.started_at is not None:
            event.poe = self.poe_info(s)
        if s.steps is not None:
            s.steps.close()
        s.steps = s.scorer = s.generator = None
        self.metrics.inc("poegpt_sequences_finished_total", mode=s.mode, reason=reason)
        if s.first_token_at is not None and len(s.tokens) > 1:
            self.metrics.observe("poegpt_time_per_output_token_seconds",
                                 (s.finished_at - s.first_token_at) / (len(s.tokens) - 1))
        if s.gen is not None and s.mode == "speculative":
            self.metrics.inc("poegpt_speculative_drafted_tokens_total", s.gen.drafted)
            self.metrics.inc("poegpt_speculative_accepted_tokens_total", s.gen.accepted)
        if s.gen is not None and s.mode == "wand":
            for st in s.gen.stages_used[0][:len(s.tokens)]:
                self.metrics.inc("poegpt_wand_exit_stage_total", stage=str(st))
        self._deliver(s, event)

    def _deliver(self, s: Sequence, event: Event) -> None:
        try:
            s.on_event(event)
        except Exception:               # the receiver is gone (server shutting down); nothing to tell
            log.debug("event for a departed request dropped", exc_info=True)

    def poe_info(self, s: Sequence) -> dict:
        """What the mode did for one sequence (the response's extra "poe" field), as the table reports it."""
        spec = s.params.spec
        return spec.entry.report(spec, s.gen, self.model.config, len(s.tokens))

    # --- log-probs ------------------------------------------------------------------------------
    def _entry(self, token: int, logp: torch.Tensor, n: int, offset: int) -> TokenLogprob:
        top = {}
        if n > 0:
            values, ids = torch.topk(logp, min(n, logp.numel()))
            top = {self._token_text[i]: _finite(v) for v, i in zip(values.tolist(), ids.tolist())}
        return TokenLogprob(self._token_text[token], _finite(float(logp[token])), top, offset)

    def _prompt_logprobs(self, s: Sequence) -> list[TokenLogprob]:
        """Log-probs of each prompt token given the ones before, under the sequence's own distribution
        (full PoE for WAND and speculative, whose tokens follow or approximate it)."""
        cfg = self.model.config
        mix = s.mix or StageMix.full(cfg.n_stages, cfg.poe_alpha)
        prompt = list(s.params.prompt)
        logp = mix.logprobs(self.model, self.model.trunk(torch.tensor([prompt], device=self.device), mix.depth))[0]
        decoder, offset, out = self.tokenizer.stream_decoder(), 0, []
        for i, t in enumerate(prompt):
            if i == 0:
                out.append(TokenLogprob(self._token_text[t], None, None, 0))
            else:
                out.append(self._entry(t, logp[i - 1], s.params.logprobs or 0, offset))
            offset += len(decoder.push(t))
        return out


def token_text(tokenizer, i: int) -> str:
    """A token's name in log-probs: its text, or "bytes:\\xNN..." when its bytes are not whole UTF-8
    characters (as vLLM names such tokens), so that the top-N dictionary keys stay distinct."""
    raw = tokenizer.token_bytes(i)         # a special token's bytes are its text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _finite(x: float) -> float:
    """JSON has no infinities; OpenAI-compatible servers report an impossible token as -9999."""
    return x if math.isfinite(x) else -9999.0
