"""The OpenAI completions protocol of `poegpt serve`: requests in, JSON and SSE out.

Requests: the OpenAI completions fields, plus `poe_mode` and the mode fields of the mode table (the
way vLLM takes extra sampling fields, the openai client's `extra_body`). The PoE fields are checked
by each mode's own validators (`ModeSpec`, `Mode.check`); nothing here names a mode. Bodies are
parsed by hand rather than through a pydantic model so that every bad input gets one clear line in
OpenAI's error shape, {"error": {"message", "type", "param", "code"}} (`ApiError`), with 400, 404
(unknown model), 429 (queue full), 503 (shutting down) or 504 (timeout): never FastAPI's 422 list,
never a 500 for the client's mistake. A parsed request is a `CompletionJob`.

Responses: the events of a request's sequences become the completions JSON, whole or as SSE
chunks (`Assembly`); every choice carries what its mode did in an extra "poe" field that OpenAI
clients ignore, and the response the request-level merge of those (`merge_reports`).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass

from ..engine import Sampling, check_prompts
from ..errors import PoEError
from ..modes import MODES, ModeSpec, field_owners, merge_reports
from ..tokenizer import clean_text
from .logprobs import TokenLogprob
from .sequence import Event, SeqParams, Sequence

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
    mode = body.get("poe_mode")
    mode = ModeSpec().mode if mode is None else mode      # the table's default mode
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


def parse_body(raw: bytes):
    """The request body as JSON (any JSON value: parse_completion says what it must be)."""
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:     # UnicodeDecodeError is a ValueError
        raise _bad(f"the request body is not valid JSON ({e}); send a JSON object") from None


def parse_completion(body, model, tokenizer, served_name: str) -> CompletionJob:
    """A /v1/completions body as a CompletionJob, or the ApiError of its first mistake."""
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
    temperature, top_p, top_k, seed = _parse_sampling(body, spec)
    stop = _parse_stop(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad(f"logprobs must be an integer between 0 and {MAX_LOGPROBS} (top log-probs per token), "
                   f"got {logprobs!r}", "logprobs")
    stream = _bool(body, "stream")
    include_usage = _parse_stream_options(body, stream)
    caps = _parse_max_tokens(body, model, prompts)
    return CompletionJob(prompts, echo_texts, caps, n, spec, temperature, top_p, top_k, seed, stop, stream,
                         include_usage, logprobs, _bool(body, "echo"), _bool(body, "return_token_ids"))


def _parse_sampling(body: dict, spec: ModeSpec) -> tuple[float, float | None, int | None, int | None]:
    """(temperature, top_p, top_k, seed), checked as the engine's Sampling checks them. A greedy-only
    mode of the table decodes at temperature 0 unless told otherwise, and refuses any other."""
    greedy_only = spec.entry.greedy_only
    temperature = _number(body, "temperature", 0.0 if greedy_only else 1.0)
    if greedy_only and temperature > 0:
        raise _bad(f"poe_mode {spec.mode!r} decodes greedily: {greedy_only.split(';')[0]}; set temperature to 0 or "
                   f"leave it out", "temperature")
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
    return temperature, top_p, top_k, seed


def _parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of non-empty strings, got {body.get('stop')!r}", "stop")
    if len(stop) > MAX_STOP:
        raise _bad(f"stop has {len(stop)} strings; give at most {MAX_STOP}", "stop")
    return tuple(stop)


def _parse_stream_options(body: dict, stream: bool) -> bool:
    """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad('stream_options must be an object like {"include_usage": true}', "stream_options")
    return _bool(options, "include_usage")


def _parse_max_tokens(body: dict, model, prompts: list[list[int]]) -> list[int]:
    """max_tokens per prompt, capped at the room its prompt leaves in the context."""
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
    return caps


# ------------------------------------------------------------------------------------------------
# responses
# ------------------------------------------------------------------------------------------------

def _logprobs_json(entries: list[TokenLogprob], shift: int = 0) -> dict:
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": [e.offset + shift for e in entries]}


class Assembly:
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


def event_error(ev: Event) -> ApiError:
    if ev.finish_reason == "timeout":
        return ApiError(504, ev.error or "the request timed out", code="timeout")
    return ApiError(503 if ev.finish_reason == "shutdown" else 500, ev.error or "generation failed")

