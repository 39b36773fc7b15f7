"""`poegpt serve`: an OpenAI-compatible HTTP server for PoE models (SPEC §10).

    poegpt serve --model RUN --port 8000 --served-name poegpt-demo
    curl -X POST http://localhost:8000/v1/completions -H "Content-Type: application/json" \\
         --data '{"model": "poegpt-demo", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}'

Endpoints: POST /v1/completions (OpenAI's completions API; SSE streaming in its chunk format ending
with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text). There is no chat
template, so /v1/chat/completions answers 400 with a line saying so.

The PoE modes are extra body fields, the way vLLM takes extra sampling fields (the openai client's
`extra_body`): poe_mode = full | prefix | stage | wand | speculative | composition, with max_stages,
stage, stages, stage_weights, safety, p99_bounds, draft_stage, k_draft. They are checked by the
engine's own validators (StageMix, check_speculative_args, check_bounds), and every choice carries
what its mode did in an extra "poe" field that OpenAI clients ignore.

Bodies are parsed by hand rather than through a pydantic model so that every bad input gets one
clear line in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, with 400, 404
(unknown model), 429 (queue full), 503 (shutting down) or 504 (timeout): never FastAPI's 422 list,
never a 500 for the client's mistake. Generation runs on the scheduler's engine thread
(`scheduler.py`, continuous batching); the event loop only parses, formats and streams. A client
that disconnects cancels its sequences, which frees their batch rows before the next decode step.

`poegpt serve` answers on its port while the checkpoint loads (`LoadingApp`: /health 503 "loading",
then 200) and drains on SIGTERM: the socket closes, in-flight requests finish (for up to
--drain-timeout seconds), the process exits with status 0.

fastapi and uvicorn are imported inside `create_app` and `cmd_serve` only, so the CLI works without
the `serve` extra installed.
"""


import asyncio
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from .engine import Sampling, check_prompts
from .errors import PoEError
from .hardware import resolve_dtype, set_threads
from .modes import MODES, ModeSpec, field_owners, merge_reports
from .scheduler import (FAILED, Event, Metrics, QueueFull, Scheduler, SchedulerClosed, SeqParams,
                        Sequence, TokenLogprob)
from .tokenizer import clean_text

MAX_LOGPROBS = 20          # top-N log-probs per token (vLLM's default cap; OpenAI's is 5)
MAX_CHOICES = 128          # prompts x n in one request
MAX_STOP = 16
DEFAULT_MAX_TOKENS = 16    # OpenAI's default for the completions API
MIN_TEMPERATURE = 0.01     # a positive temperature below this samples at this (vLLM's rule)

OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                 "stream_options", "logprobs", "echo", "user", "best_of", "suffix", "presence_penalty",
                 "frequency_penalty", "logit_bias", "return_token_ids"}


def known_fields() -> set[str]:
    """The request fields this server takes: OpenAI's, poe_mode, and every mode field of the mode table."""
    return OPENAI_FIELDS | set(field_owners()) | {"poe_mode"}


class ApiError(Exception):
    """A request that cannot be served, as OpenAI's error JSON with an HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, " ".join(str(message).split()), param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------
# request parsing: one clear line per mistake
# ------------------------------------------------------------------------------------------------

def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(f"{name} must be an integer, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise _bad(f"{name} must be {rng}, got {v}", name)
    return v


def _number(body: dict, name: str, default):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise _bad(f"{name} must be a finite number, got {v!r}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false, got {v!r}", name)
    return v


def _param_of(message: str, default: str) -> str:
    """The field a validator's message names (they start with it), for the error's `param`."""
    first = message.split(" ", 1)[0].strip("'\"")
    return first if first in known_fields() else default


@dataclass
class CompletionJob:
    """A parsed, validated /v1/completions request."""
    prompts: list[list[int]]
    echo_texts: list[str]
    max_tokens: list[int]          # per prompt, capped at the room left in the context
    n: int
    spec: ModeSpec
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    return_token_ids: bool

    def sequences(self, on_event, group) -> list[Sequence]:
        """One sequence per prompt and choice; choice j of a prompt is seeded seed + j, so that choice 0
        of a seeded request samples exactly what model.generate(..., seed=seed) samples alone."""
        seqs = []
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                seed = self.seed + j if self.seed is not None else secrets.randbits(63)
                sampling = Sampling(do_sample=self.temperature > 0, temperature=self.temperature, top_k=self.top_k,
                                    top_p=self.top_p, seed=seed)
                params = SeqParams(tuple(prompt), self.max_tokens[i], self.spec, sampling, self.stop, self.logprobs,
                                   prompt_logprobs=self.echo and self.logprobs is not None)
                seqs.append(Sequence(params, i * self.n + j, on_event, group))
        return seqs


def parse_prompts(body: dict, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Prompts as token ids (text gets <|bos|> prepended, ids are taken as given) and their echo text."""
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt is required: a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")
    texts = ids = None
    if isinstance(p, str):
        texts = [p]
    elif isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            texts = p
        elif all(_is_int(x) for x in p):
            ids = [p]
        elif all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p):
            ids = p
    elif isinstance(p, list):
        raise _bad("prompt is an empty list; give at least one prompt", "prompt")
    if texts is None and ids is None:
        raise _bad("prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                   "prompt")
    if texts is not None:
        for i, t in enumerate(texts):
            if not t:
                raise _bad("prompt is empty" + (f" (prompt[{i}])" if len(texts) > 1 else "")
                           + "; give some text to continue", "prompt")
        return [tokenizer.encode(t) for t in texts], [clean_text(t) for t in texts]   # echo: valid UTF-8 only
    for i, r in enumerate(ids):
        if not r:
            raise _bad(f"prompt[{i}] is an empty list of token ids; give at least one token", "prompt")
        bad = [t for t in r if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise _bad(f"token id {bad[0]} in the prompt is outside the vocabulary [0, {tokenizer.vocab_size})",
                       "prompt")
    return [list(r) for r in ids], [tokenizer.decode(r, skip_special_tokens=True) for r in ids]


def parse_mode(body: dict, model) -> ModeSpec:
    """The PoE fields as a ModeSpec of the mode table, checked by the mode's own validators."""
    mode = body.get("poe_mode", "full")
    mode = "full" if mode is None else mode
    if not isinstance(mode, str) or mode not in MODES:
        raise _bad(f"unknown poe_mode {mode!r}; choose one of {', '.join(MODES)}", "poe_mode")
    own = {f.name for f in MODES[mode].fields}
    for name, owners in field_owners().items():
        if body.get(name) is not None and name not in own:
            raise _bad(f"{name} applies to poe_mode '{owners[0]}' only, but poe_mode is '{mode}'; "
                       f"set poe_mode to '{owners[0]}' or drop {name}", name)
    try:
        spec = ModeSpec(mode, **{name: body.get(name) for name in own})
        spec.check(model)
    except PoEError as e:
        raise _bad(str(e), _param_of(str(e), "poe_mode")) from None
    return spec


def parse_completion(body, model, tokenizer, served_name: str) -> CompletionJob:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - known_fields())
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}; this server takes the OpenAI completions fields and the PoE "
                   f"fields poe_mode, {', '.join(field_owners())}", unknown[0])
    name = body.get("model")
    if name is None:
        raise _bad(f"model is required; this server serves {served_name!r}", "model")
    if name != served_name:
        raise ApiError(404, f"The model {name!r} does not exist; this server serves {served_name!r}", "model",
                       code="model_not_found")
    for field_, ok in (("suffix", None), ("logit_bias", {}), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(field_) not in (None, ok):
            raise _bad(f"{field_} is not supported by this server; leave it out", field_)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")

    prompts, echo_texts = parse_prompts(body, tokenizer)
    n = _int(body, "n", 1, 1, MAX_CHOICES)
    if len(prompts) * n > MAX_CHOICES:
        raise _bad(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one request; split it", "n")
    best_of = _int(body, "best_of", n, 1)
    if best_of != n:
        raise _bad("best_of other than n is not supported by this server; leave it out", "best_of")
    spec = parse_mode(body, model)

    temperature = _number(body, "temperature", 0.0 if spec.mode == "wand" else 1.0)
    if spec.mode == "wand" and temperature > 0:
        raise _bad("poe_mode 'wand' decodes greedily (its exit rule bounds the argmax); set temperature to 0 or "
                   "leave it out", "temperature")
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE      # as vLLM does: below it, log-probs / T overflow to inf (found by the fuzz)
    top_p = _number(body, "top_p", None)
    top_k = body.get("top_k")
    if top_k in (-1, 0):                   # vLLM's spelling of "no top-k"
        top_k = None
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise _bad(f"top_k must be a positive integer (or -1 for none), got {top_k!r}", "top_k")
    seed = _int(body, "seed", None, -2 ** 63, 2 ** 63 - 1)     # int64, as OpenAI and vLLM take it
    try:
        Sampling(do_sample=temperature > 0, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except PoEError as e:
        raise _bad(str(e), _param_of(str(e), "temperature")) from None

    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of non-empty strings, got {body.get('stop')!r}", "stop")
    if len(stop) > MAX_STOP:
        raise _bad(f"stop has {len(stop)} strings; give at most {MAX_STOP}", "stop")

    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad(f"logprobs must be an integer between 0 and {MAX_LOGPROBS} (top log-probs per token), "
                   f"got {logprobs!r}", "logprobs")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad('stream_options must be an object like {"include_usage": true}', "stream_options")
        include_usage = _bool(options, "include_usage")

    ctx = model.config.sequence_len
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0)
    if max_tokens > ctx:
        raise _bad(f"max_tokens={max_tokens} is more than this model's context of {ctx} tokens", "max_tokens")
    caps = []
    for prompt in prompts:
        # a request for more tokens than the context has room for is served up to the context's end
        # (finish_reason "length"), as the model card's 512-token example on a 512-token model expects;
        # a prompt that leaves no room at all is an error, with the engine's own message
        room, needed = ctx - len(prompt), min(max_tokens, 1)
        try:
            check_prompts(model, [prompt], max_tokens if room < needed else min(max_tokens, room))
        except PoEError as e:
            raise _bad(str(e), "prompt") from None
        caps.append(min(max_tokens, room))
    return CompletionJob(prompts, echo_texts, caps, n, spec, temperature, top_p, top_k, seed, tuple(stop), stream,
                         include_usage, logprobs, _bool(body, "echo"), _bool(body, "return_token_ids"))


# ------------------------------------------------------------------------------------------------
# responses
# ------------------------------------------------------------------------------------------------

def _logprobs_json(entries: list[TokenLogprob], shift: int = 0) -> dict:
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": [e.offset + shift for e in entries]}


class _Assembly:
    """Events of one request turned into OpenAI completions JSON (whole, or as stream chunks)."""

    def __init__(self, job: CompletionJob, rid: str, served_name: str):
        self.job, self.rid, self.served_name = job, rid, served_name
        self.created = int(time.time())
        total = len(job.prompts) * job.n
        self.text = [[] for _ in range(total)]
        self.tokens = [[] for _ in range(total)]
        self.logprobs = [[] for _ in range(total)]
        self.prompt_logprobs: list[list | None] = [None] * total
        self.finish = [None] * total
        self.poe = [None] * total
        self.started = [False] * total
        self.unfinished = total

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    def echo_text(self, index: int) -> str:
        return self.job.echo_texts[index // self.job.n] if self.job.echo else ""

    def add(self, ev: Event) -> None:
        i = ev.index
        self.text[i].append(ev.text)
        self.tokens[i] += ev.token_ids
        if ev.logprobs:
            self.logprobs[i] += ev.logprobs
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs[i] = ev.prompt_logprobs
        if ev.finish_reason is not None and self.finish[i] is None:
            self.finish[i], self.poe[i] = ev.finish_reason, ev.poe
            self.unfinished -= 1

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, i: int, text: str, entries: list[TokenLogprob] | None, prompt_entries, token_ids,
                finish, poe, first: bool) -> dict:
        job = self.job
        shift = len(self.echo_text(i)) if job.echo else 0
        if first and job.echo:
            text = self.echo_text(i) + text
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        if job.logprobs is not None:
            lp = _logprobs_json(entries or [], shift)
            if first and prompt_entries:
                pl = _logprobs_json(prompt_entries)
                lp = {k: pl[k] + lp[k] for k in lp}
            choice["logprobs"] = lp
        if job.return_token_ids:
            if first:
                choice["prompt_token_ids"] = job.prompts[i // job.n]
            choice["token_ids"] = token_ids
        if poe is not None:
            choice["poe"] = poe
        return choice

    def response(self) -> dict:
        choices = [self._choice(i, "".join(self.text[i]), self.logprobs[i], self.prompt_logprobs[i], self.tokens[i],
                                self.finish[i], self.poe[i], True) for i in range(len(self.text))]
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.served_name,
                "choices": choices, "usage": self.usage(), "poe": merge_reports(self.poe)}

    def _wrap(self, choices: list[dict], **extra) -> str:
        obj = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.served_name,
               "choices": choices}
        if self.job.include_usage:
            obj["usage"] = None
        obj.update(extra)
        return sse(obj)

    def chunk(self, ev: Event) -> str | None:
        """The SSE chunk for one event (None when it carries nothing to tell)."""
        self.add(ev)
        first = not self.started[ev.index]
        job = self.job
        if not (ev.text or ev.finish_reason or (first and job.echo) or (ev.token_ids and job.return_token_ids)
                or (ev.logprobs and job.logprobs is not None)):
            return None
        self.started[ev.index] = True
        return self._wrap([self._choice(ev.index, ev.text, ev.logprobs, ev.prompt_logprobs, ev.token_ids,
                                        ev.finish_reason, ev.poe, first)])

    def usage_chunk(self) -> str:
        return self._wrap([], usage=self.usage(), poe=merge_reports(self.poe))


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def _event_error(ev: Event) -> ApiError:
    if ev.finish_reason == "timeout":
        return ApiError(504, ev.error or "the request timed out", code="timeout")
    return ApiError(503 if ev.finish_reason == "shutdown" else 500, ev.error or "generation failed")


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------

def create_app(model, tokenizer, served_name: str = "poegpt", max_batch: int = 8, max_queue: int = 64,
               timeout: float | None = 600.0):
    """The FastAPI app serving `model` (eval mode) with `tokenizer` under `served_name`. The engine
    thread starts now and stops when the app's lifespan ends."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if tokenizer.vocab_size < model.config.vocab_size:
        raise PoEError(f"the tokenizer has {tokenizer.vocab_size} ids but the model predicts "
                       f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    metrics = Metrics()
    scheduler = Scheduler(model, tokenizer, max_batch, max_queue, timeout, metrics).start()
    metrics.counter("poegpt_http_requests_total", "HTTP requests, by route and status code.")
    metrics.counter("poegpt_requests_total", "Accepted completion requests, by PoE mode.")
    metrics.counter("poegpt_prompt_tokens_total", "Prompt tokens of accepted completion requests.")
    metrics.histogram("poegpt_request_latency_seconds", "End-to-end latency of completion requests, by PoE mode.")
    cfg = model.config
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="poegpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    routes = ("/v1/completions", "/v1/models", "/health", "/metrics", "/v1/chat/completions")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        path = request.url.path
        if exc.status_code == 404:
            msg = f"no route {request.method} {path}; this server offers POST /v1/completions, GET /v1/models, " \
                  f"GET /health and GET /metrics"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {path}"
        else:
            msg = str(exc.detail)
        return JSONResponse(ApiError(exc.status_code, msg).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        return JSONResponse(ApiError(500, f"internal server error: {type(exc).__name__}: {exc}").body(),
                            status_code=500)

    async def read_json(request: Request):
        raw = await request.body()
        if not raw.strip():
            raise _bad("the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:     # UnicodeDecodeError is a ValueError
            raise _bad(f"the request body is not valid JSON ({e}); send a JSON object") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.monotonic()
        job = parse_completion(await read_json(request), model, tokenizer, served_name)
        rid = f"cmpl-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        seqs = job.sequences(lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), rid)
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e)) from None
        metrics.inc("poegpt_requests_total", mode=job.spec.mode)
        metrics.inc("poegpt_prompt_tokens_total", sum(len(p) for p in job.prompts))
        out = _Assembly(job, rid, served_name)

        def finished():
            scheduler.cancel(seqs)      # no-op for finished sequences; frees the rows of a departed client
            metrics.observe("poegpt_request_latency_seconds", time.monotonic() - t0, mode=job.spec.mode)

        if job.stream:
            async def events():
                try:
                    while not out.done:
                        ev = await queue.get()
                        if ev.finish_reason in FAILED:
                            yield sse(_event_error(ev).body())
                            break
                        chunk = out.chunk(ev)
                        if chunk:
                            yield chunk
                    else:
                        if job.include_usage:
                            yield out.usage_chunk()
                    yield "data: [DONE]\n\n"
                finally:                 # also runs when the client disconnects and the task is cancelled
                    finished()
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            check_at = time.monotonic() + 0.25
            while not out.done:
                try:
                    ev = await asyncio.wait_for(queue.get(), 0.25)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() >= check_at:        # whether or not events keep coming
                    check_at = time.monotonic() + 0.25
                    if await request.is_disconnected():
                        return Response(status_code=499)   # nobody to answer; the rows are freed below
                if ev is None:
                    continue
                if ev.finish_reason in FAILED:
                    raise _event_error(ev)
                out.add(ev)
        finally:
            finished()
        return JSONResponse(out.response())

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat_completions():
        raise ApiError(400, "this model has no chat template, so /v1/chat/completions is not available; "
                            "use POST /v1/completions with a plain-text prompt")

    def model_card() -> dict:
        return {"id": served_name, "object": "model", "created": created, "owned_by": "poegpt",
                "max_model_len": cfg.sequence_len,
                "poe": {"n_stages": cfg.n_stages, "n_layer": cfg.n_layer, "boundaries": list(cfg.boundaries),
                        "modes": list(MODES), "batched_modes": [m for m, e in MODES.items() if e.batched],
                        "wand_calibrated": model.calibration.wand_p99_bounds is not None}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != served_name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {served_name!r}", "model",
                           code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        state = {"running": scheduler.running(), "queued": scheduler.queue_depth}
        if scheduler.draining:       # SIGTERM: finishing what it has, taking nothing new
            return JSONResponse({"status": "draining", **state}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_CountRequests, metrics=metrics, routes=routes)
    return app


class LoadingApp:
    """The ASGI app `poegpt serve` runs, so that the port answers while the model loads.

    On lifespan startup, `load()` (read the checkpoint, build the app with `create_app`) runs on a
    thread. Until it returns, GET /health answers 503 {"status": "loading"} and every other request a
    503 error in OpenAI's shape; then every request goes to the app it returned. If it raises, /health
    answers 503 {"status": "failed", "error": ...} and `on_error(message)` is called (the CLI stops
    the server and exits with the message). On lifespan shutdown the loaded app's engine stops."""

    def __init__(self, load: Callable[[], object], on_error: Callable[[str], None] | None = None):
        self._load, self._on_error = load, on_error
        self.app = None
        self.error: str | None = None
        self.loaded = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="poegpt-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.app = self._load()
        except BaseException as e:  # noqa: BLE001 - reported on /health and by the CLI
            self.error = str(e) if isinstance(e, PoEError) else f"{type(e).__name__}: {e}"
            if self._on_error is not None:
                self._on_error(self.error)
        finally:
            self.loaded.set()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.app is not None:
                        self.app.state.scheduler.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        app = self.app
        if app is not None:
            return await app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope.get("path") == "/health":
            body = {"status": "loading"} if self.error is None else {"status": "failed", "error": self.error}
        else:
            body = ApiError(503, "the model is still loading; retry when GET /health answers 200" if self.error is None
                            else f"the model failed to load: {self.error}").body()
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": raw})


class _CountRequests:
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


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------

def add_serve_parser(subparsers) -> None:
    """Register `poegpt serve [--model PATH] [--host H] [--port P] [--served-name NAME] ...`."""
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching "
                                            "(docs/serving.md)")
    s.add_argument("--model", help="checkpoint or run directory (default: the shipped demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port) (default %(default)s)")
    s.add_argument("--served-name", dest="served_name",
                   help="the model name clients send (default: --model as given, or poegpt-demo)")
    s.add_argument("--max-batch", dest="max_batch", type=int, default=8,
                   help="sequences generated at once (rows of the batched KV cache)")
    s.add_argument("--max-queue", dest="max_queue", type=int, default=64,
                   help="requests that may wait for a row; more get 429")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included (0 = no limit); then 504")
    s.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=60.0,
                   help="on SIGTERM / Ctrl-C, seconds in-flight requests may still run; then they end with a "
                        "shutdown error")
    s.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the engine (default: torch's, one per core); 1 is best on a "
                        "machine whose cores other work keeps busy")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights and KV cache dtype (default auto: bf16 where native, else fp32)")
    s.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"], help="uvicorn log level (default %(default)s)")
    s.set_defaults(fn=cmd_serve)


def cmd_serve(a) -> None:
    try:
        import uvicorn
        import fastapi  # noqa: F401
    except ImportError:
        raise PoEError("poegpt serve needs fastapi and uvicorn: pip install 'poegpt[serve]'") from None
    import contextlib

    import torch
    from .checkpoint import load_model, resolve_checkpoint
    if a.max_batch < 1 or a.max_queue < 1:
        raise PoEError("--max-batch and --max-queue must be >= 1")
    if not 0 <= a.port <= 65535:
        raise PoEError(f"--port must be in 0..65535, got {a.port}")
    if not a.timeout >= 0:
        raise PoEError(f"--timeout must be >= 0 seconds (0 = no limit), got {a.timeout}")
    if not a.drain_timeout >= 0:
        raise PoEError(f"--drain-timeout must be >= 0 seconds, got {a.drain_timeout}")
    if a.served_name is not None and not a.served_name.strip():
        raise PoEError("--served-name is empty; give the name clients will send as `model`")
    if a.threads is not None:
        set_threads(a.threads)
    resolve_checkpoint(a.model)            # a missing checkpoint is one line now, not after the server started
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on connections of a socket whose proto says
    # TCP, and without it Nagle holds every second write of a response (each SSE chunk after the first)
    # until the client's delayed ACK, about 40 ms on Linux
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))
    except OSError as e:
        sock.close()
        raise PoEError(f"cannot listen on {a.host}:{a.port} ({e.strerror or e}); pick another --port or --host") \
            from None
    host, port = sock.getsockname()[:2]
    name = a.served_name or (str(a.model) if a.model else "poegpt-demo")

    def load():
        # on a thread while the port already answers: /health is 503 {"status": "loading"} meanwhile
        model, tok = load_model(a.model, dtype=resolve_dtype(a.dtype))
        if tok is None:
            raise PoEError("the checkpoint has no tokenizer; serving needs one")
        app = create_app(model, tok, name, a.max_batch, a.max_queue, a.timeout or None)
        print(f"poegpt: serving {name!r} ({model.config.n_layer} layers, {model.config.n_stages} stages, context "
              f"{model.config.sequence_len}) on http://{host}:{port}/v1  (max batch {a.max_batch}, queue "
              f"{a.max_queue}); SIGTERM or Ctrl-C drains and stops", file=sys.stderr, flush=True)
        return app

    class Server(uvicorn.Server):
        """uvicorn's server with a drain: the first SIGTERM / SIGINT stops the listening socket (uvicorn)
        and new requests (the scheduler answers 503), lets the in-flight ones finish for up to
        --drain-timeout seconds, ends the rest with a shutdown error, then exits with status 0."""

        def handle_exit(self, sig, frame):
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if not first:
                return
            # a signal handler: no printing through sys.stderr (it may be mid-write), no locks
            os.write(2, f"poegpt: draining: in-flight requests may run for up to {a.drain_timeout:g} s; new "
                        f"requests are refused\n".encode())
            if app.app is not None:
                scheduler = app.app.state.scheduler
                scheduler.drain()
                timer = threading.Timer(a.drain_timeout, scheduler.abort)
                timer.daemon = True
                timer.start()

        if hasattr(uvicorn.Server, "capture_signals"):
            @contextlib.contextmanager
            def capture_signals(self):
                with super().capture_signals():
                    yield
                    # drained: exit normally rather than re-raise the signal (status 0, not -15)
                    getattr(self, "_captured_signals", []).clear()

    def failed(message: str) -> None:
        server.should_exit = True

    app = LoadingApp(load, failed)
    # uvicorn's own limit is a backstop: the scheduler ends what is left at --drain-timeout
    config = uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=a.drain_timeout + 5)
    server = Server(config)
    print(f"poegpt: loading {name!r}; http://{host}:{port}/health answers 503 until it is ready", file=sys.stderr,
          flush=True)
    server.run(sockets=[sock])
    if app.error is not None:
        raise PoEError(app.error)
    print("poegpt: stopped", file=sys.stderr, flush=True)
