"""Continuous batching for `poegpt serve`: one engine thread runs every request (docs/design.md §10.2).

A request becomes sequences (one per prompt and choice) that wait in a bounded FIFO queue. One
engine thread owns the model and loops:

1. admit waiting sequences while fewer than `max_batch` are running;
2. start each admitted sequence: its prompt is prefilled with the engine's `prefill` into a free row
   of a fixed-slot KV cache (max_batch rows x the model's context) and it picks its first token;
3. run ONE decode step for all rows together: each row feeds its last token at its own position (the
   cache keeps per-row lengths and the trunk takes per-row positions), the trunk runs to the deepest
   stage any row needs, and each row takes its token as its mode's `BatchRow` says (the mode table):
   sampled from its StageMix (rows with the same mix in one call, each with its own seeded generator,
   `engine.pick`), or by WAND's exit rule over every stage (`wand.exit_tokens`: the token and the
   stage it exits at, as WAND alone picks them; the deeper layers run for it anyway, since the step
   runs them for the batch and they fill its cache exactly as WAND's lazy fill would).

Every mode runs in the shared batch. A self-speculative row decodes there as plain steps of its
verifier (full PoE, or the last stage alone): greedy tokens equal full greedy and sampled ones follow
the verifier's distribution exactly, so the request costs what a full-mode one does. When it is the
only row and nothing waits, it has the step to itself and runs its mode's own cycles instead (`alone`:
draft with the first stages, verify with the rest, on its row of the shared cache), where the cost
model says drafting pays: speculation for a lone request, batching under load (vLLM likewise turns
speculation off above a batch size). Greedy output is the same either way; a seeded sampled row
always decodes plainly, so its seed gives the same text whatever the load. A row that wants per-token
log-probs decodes plainly too (its distribution is at hand there).

A sequence that finishes leaves between steps and the last row of the batch moves into its row
(`KVCache.move_row`), so the running rows are always rows 0..n-1 and the batch is a view of the
cache (`KVCache.rows`, no copy per step). New sequences join the running batch at the next step:
that is the continuous batching.

A row computes exactly what the same request computes alone with `model.generate`: its prefill is
the same call on a one-row view of the cache, its decode attends only to its own keys (per-row
masks), rows never mix in the trunk, and its sampler is the same call on a generator with the same
seed. Layers deeper than a row's own mode needs may run for it when a deeper request shares the
step; their results are never read by that row.

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
import torch.nn.functional as F

from ..cache import new_cache
from ..engine import Generation, pick, prefill
from ..modes import BatchRow
from ..wand import exit_tokens
from .logprobs import Logprobs
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
        self.batch: list[Sequence] = []    # running sequences; batch[i] owns cache row i
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
            self.cancel(list(self.waiting) + self.batch, reason)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def running(self) -> int:
        """Sequences being generated."""
        return sum(s.state == "running" for s in self.batch)

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
            while not (self.waiting or self.batch or self._closed):
                self._cv.wait()
            if self._closed:
                return None, None
            now = time.monotonic()
            for s in [s for s in self.waiting if s.deadline is not None and now > s.deadline]:
                self.waiting.remove(s)
                self._ungroup(s)
                self._done(s, "timeout", error=self._message("timeout"))
            admitted = []
            while self.waiting and len(self.batch) + len(admitted) < self.max_batch:
                s = self.waiting.popleft()
                self._ungroup(s)
                s.state = "running"
                admitted.append(s)
            return admitted, now

    def _stop_running(self, now: float) -> None:
        """End running sequences that were cancelled or are past their deadline (their rows are swept next)."""
        for s in self.batch:
            if s.stop_reason is None and s.deadline is not None and now > s.deadline:
                s.stop_reason = "timeout"
            if s.stop_reason is not None and s.state == "running":
                self._done(s, s.stop_reason, error=self._message(s.stop_reason))

    def _step(self, admitted: list[Sequence]) -> None:
        """One loop of the engine: start the admitted sequences, one decode step of the batch."""
        try:
            self._sweep()
            for s in admitted:
                self._start(s)
            self._sweep()
            self._step_batch()
        except Exception as e:    # a bug, not a bad request: fail what runs, keep serving
            for s in admitted + self.batch:
                if s.state != "done":
                    self._fail(s, e)
            self.batch = []

    def _shutdown(self) -> None:
        with self._cv:                    # shutting down: tell everyone still here
            for s in list(self.waiting) + self.batch:
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
            entry = p.spec.entry
            s.row = p.spec.batch_row(self.model)
            if p.prompt_logprobs:
                s.prompt_lp = self.logprobs.prompt(list(p.prompt), s.row.mix, p.logprobs or 0)
            if p.max_tokens == 0:
                self._send(s, Event(s.index), "length")
                return
            if not entry.static:         # what the mode reports: counts kept per sequence
                s.gen = Generation([[]], stages_used=[[]] if s.row.exit else None, extra={"plain_steps": 0})
                if entry.alone is not None and p.logprobs is None:
                    s.alone = entry.alone(p.spec, self.model, p.sampling)
            self._start_row(s)
        except Exception as e:   # one bad sequence must not take the engine down
            self._fail(s, e)

    def _start_row(self, s: Sequence) -> None:
        """Prefill into the batch's next free row and take the first token: exactly the mode's first
        step alone, on a one-row view of the shared cache."""
        p = s.params
        s.generator = p.sampling.generator(self.device)
        row = len(self.batch)
        self.batch.append(s)
        hs = prefill(self.model, self.cache.rows(row, row + 1), [list(p.prompt)], s.row.mix.depth)
        s.length = len(p.prompt)
        self._take(s.row, [s], hs)

    def _take(self, row: BatchRow, seqs: list[Sequence], hs: list) -> None:
        """Each sequence's next token from the boundary states hs [(n, d)] of its rows (all of one BatchRow)."""
        if row.exit is None:
            logp = row.mix.logprobs(self.model, hs)
            for j, s in enumerate(seqs):
                self._emit(s, [int(pick(logp[j:j + 1], s.params.sampling, s.generator))], [logp[j]])
            return
        logps = [F.log_softmax(self.model.stage_logits(h, k), -1) for k, h in enumerate(hs)]
        tokens, stages = exit_tokens(logps, *row.exit)
        logp = row.mix.combine(logps)            # the log-probs reported: full PoE, WAND's target
        for j, (s, t, stage) in enumerate(zip(seqs, tokens.tolist(), stages.tolist())):
            s.gen.stages_used[0].append(stage)
            self._emit(s, [t], [logp[j]])

    def _step_batch(self) -> None:
        rows = list(self.batch)            # all running: finished rows were swept before this step
        if not rows:
            return
        n = len(rows)
        try:
            if n == 1 and rows[0].alone is not None and not self.waiting:
                self._cycle_alone(rows[0])
            else:
                self._step_rows(rows)
        except Exception as e:
            for s in rows:
                if s.state == "running":
                    self._fail(s, e)
        self.metrics.inc("poegpt_decode_steps_total")
        self.metrics.observe("poegpt_decode_batch_size", n)
        self._sweep()

    def _step_rows(self, rows: list[Sequence]) -> None:
        """One token for every row: one trunk walk to the deepest stage any row needs."""
        view = self.cache.rows(0, len(rows), [s.length for s in rows])
        idx = torch.tensor([[s.pending] for s in rows], device=self.device)
        hs = self.model.trunk(idx, max(s.row.mix.depth for s in rows), view)
        groups: dict[BatchRow, list[int]] = {}
        for r, s in enumerate(rows):
            s.length += 1
            groups.setdefault(s.row, []).append(r)
            if s.gen is not None:          # a non-static mode's plain step (speculative: of its verifier)
                s.gen.passes += 1
                s.gen.extra["plain_steps"] += s.row.exit is None
        for row, ix in groups.items():
            sel = torch.tensor(ix, device=self.device)
            self._take(row, [rows[r] for r in ix], [h[sel, -1] for h in hs[: row.mix.depth]])

    def _cycle_alone(self, s: Sequence) -> None:
        """The lone row's own cycle (speculative: draft and verify, or a plain step) on its cache row."""
        view = self.cache.rows(0, 1, [s.length])
        room = view.max_len - 1 - s.length
        idx, m, last, k = s.alone.cycle(view, torch.tensor([s.pending], device=self.device), room)
        m = int(m[0])
        s.length += m + 1
        g = s.gen
        g.passes += 1
        g.drafted, g.accepted = g.drafted + k, g.accepted + m
        g.extra["plain_steps"] += k == 0
        if k:
            s.alone.update(m, 1)
        self._emit(s, idx[0, 1:m + 1].tolist() + [int(last[0])], None)

    def _sweep(self) -> None:
        """Drop finished sequences; the batch's last row moves into each freed row."""
        for i in range(len(self.batch) - 1, -1, -1):
            if self.batch[i].state == "done":
                last = len(self.batch) - 1
                if i != last:
                    self.cache.move_row(last, i, self.batch[last].length)
                    self.batch[i] = self.batch[last]
                self.batch.pop()

    # --- tokens out -----------------------------------------------------------------------------
    def _emit(self, s: Sequence, tokens: list[int], logps: list[torch.Tensor] | None) -> None:
        """Record new tokens of a running sequence and send them; finish it on EOS, stop or length."""
        p = s.params
        texts, entries, taken, reason = [], [] if p.logprobs is not None else None, [], None
        for i, t in enumerate(tokens):
            t = int(t)
            if entries is not None:
                entries.append(self.logprobs.entry(t, logps[i], p.logprobs, len(s.stream.text)))
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
        s.alone = s.generator = None
        self.metrics.inc("poegpt_sequences_finished_total", mode=s.mode, reason=reason)
        if s.first_token_at is not None and len(s.tokens) > 1:
            self.metrics.observe("poegpt_time_per_output_token_seconds",
                                 (s.finished_at - s.first_token_at) / (len(s.tokens) - 1))
        if s.gen is not None:             # a non-static sequence that ran: the counters its mode's report feeds
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
