"""Continuous batching for `poegpt serve`: one engine thread runs every request (docs/design.md §10.2).

A request becomes sequences (one per prompt and choice) that wait in a bounded FIFO queue. One
engine thread owns the model and loops:

1. admit waiting sequences while fewer than `max_batch` are running;
2. start each admitted sequence. One of a batched mode (the mode table's `entry.batched`: a static
   `StageMix`, one token per row per step) is prefilled with the engine's `prefill` into a free row
   of a fixed-slot KV cache (max_batch rows x the model's context) and picks its first token. Any
   other (WAND, self-speculative) gets its own batch-1 step iterator from `modes.mode_steps`, with
   its own cache: a solo sequence;
3. advance every solo sequence by one step (one token, or one verification pass);
4. run ONE decode step for all batched rows together: each row feeds its last token at its own
   position (the cache keeps per-row lengths and the trunk takes per-row positions), the trunk runs
   to the deepest stage any row needs, and each row combines its own stages (`StageMix.logprobs`,
   rows with the same mix in one call) and samples with its own seeded generator (`engine.pick`).

A sequence that finishes leaves between steps and the last row of the batch moves into its row
(`KVCache.move_row`), so the running rows are always rows 0..n-1 and the batch is a view of the
cache (`KVCache.rows`, no copy per step). New sequences join the running batch at the next step:
that is the continuous batching.

A row computes exactly what the same request computes alone with `model.generate`: its prefill is
the same call on a one-row view of the cache, its decode attends only to its own keys (per-row
masks), rows never mix in the trunk, and its sampler is the same call on a generator with the same
seed. Layers deeper than a row's own mode needs may run for it when a deeper request shares the
step; their results are never read by that row.

Why solo sequences run as their own batch-1 jobs: WAND exits each token at its own stage and fills
the skipped layers lazily, and speculative decoding drafts and verifies several positions per pass
and rolls its cache back; neither is one token per row per step. They run interleaved with the
batch (one step each per loop), so neither side waits for the other to finish.

Text is decoded here (`TextStream`): a stop string ends its sequence as soon as it appears, so its
row is freed at once. Events go back to the caller (the HTTP side) through each sequence's callback;
what a mode did is the table's per-sequence report (`entry.report`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from ..cache import new_cache
from ..engine import StageMix, pick, prefill
from ..modes import mode_steps
from .logprobs import Logprobs, Scorer
from .metrics import Metrics, record_report, register_engine_metrics
from .sequence import Event, Sequence
from ..textstream import TextStream

log = logging.getLogger("poegpt.serve")


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down and takes no new work."""


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
        self.batch: list[Sequence] = []    # batched sequences; batch[i] owns cache row i
        self.solo: list[Sequence] = []     # sequences of the other modes, each with its own steps
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._groups: collections.Counter = collections.Counter()   # request -> its sequences still waiting
        self._cv = threading.Condition()
        self._closed = False
        self.draining = False              # set by drain(): no new requests, the running ones go on
        self._thread: threading.Thread | None = None
        self.logprobs = Logprobs(model, tokenizer)
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
                admitted, now = self._admit()
                if admitted is None:
                    break
                self._stop_running(now)
                self._step(admitted)
        self._shutdown()

    def _admit(self) -> tuple[list[Sequence] | None, float | None]:
        """Wait for work; end waiting sequences past their deadline; take waiting ones while rows are
        free. (None, None) once the scheduler is closed."""
        with self._cv:
            while not (self.waiting or self.batch or self.solo or self._closed):
                self._cv.wait()
            if self._closed:
                return None, None
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
            return admitted, now

    def _stop_running(self, now: float) -> None:
        """End running sequences that were cancelled or are past their deadline (their rows are swept next)."""
        for s in self.batch + self.solo:
            if s.stop_reason is None and s.deadline is not None and now > s.deadline:
                s.stop_reason = "timeout"
            if s.stop_reason is not None and s.state == "running":
                self._done(s, s.stop_reason, error=self._message(s.stop_reason))

    def _step(self, admitted: list[Sequence]) -> None:
        """One loop of the engine: start the admitted sequences, one step of each solo sequence, one
        decode step of the batch."""
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

    def _shutdown(self) -> None:
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
        p = s.params
        s.started_at = time.monotonic()
        self.metrics.observe("poegpt_queue_wait_seconds", s.started_at - s.submitted_at)
        s.stream = TextStream(self.tokenizer, p.stop, self.eos_token_id)
        try:
            if p.spec.entry.batched:
                s.mix = p.spec.stage_mix(self.model)
            if p.prompt_logprobs:
                s.prompt_lp = self.logprobs.prompt(list(p.prompt), s.mix or p.spec.target_mix(self.model),
                                                   p.logprobs or 0)
            if p.max_tokens == 0:
                self._send(s, Event(s.index), "length")
            elif p.spec.entry.batched:
                self._start_batched(s)
            else:
                self._start_solo(s)
        except Exception as e:   # one bad sequence must not take the engine down
            self._fail(s, e)

    def _start_solo(self, s: Sequence) -> None:
        """The mode's own step iterator (and a scorer of its target distribution when log-probs are asked for)."""
        p = s.params
        s.steps, s.gen = mode_steps(self.model, [list(p.prompt)], p.spec, p.max_tokens, p.sampling,
                                    self.eos_token_id)
        if p.logprobs is not None:
            s.scorer = Scorer(self.model, p.prompt, p.max_tokens, p.spec.target_mix(self.model))
        self.solo.append(s)

    def _start_batched(self, s: Sequence) -> None:
        """Prefill into the batch's next free row and pick the first token: exactly decode_static's
        first step, on a one-row view of the shared cache."""
        p = s.params
        s.generator = p.sampling.generator(self.device)
        row = len(self.batch)
        self.batch.append(s)
        hs = prefill(self.model, self.cache.rows(row, row + 1), [list(p.prompt)], s.mix.depth)
        s.length = len(p.prompt)
        logp = s.mix.logprobs(self.model, hs)
        self._emit(s, [int(pick(logp, p.sampling, s.generator))], [logp[0]])

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
                entries.append(self.logprobs.entry(t, lp, p.logprobs, len(s.stream.text)))
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
        if s.gen is not None:             # a solo sequence that ran: the counters its mode's report feeds
            record_report(self.metrics, event.poe)
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
