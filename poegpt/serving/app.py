"""The FastAPI app of `poegpt serve`: routes, error handlers, and the engine it drives.

Endpoints: POST /v1/completions (OpenAI's completions API; SSE streaming in its chunk format ending
with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text). There is no chat
template, so /v1/chat/completions answers 400 with a line saying so. Every error, FastAPI's own
404/405 included, is answered in OpenAI's shape (`protocol.ApiError`).

Generation runs on the scheduler's engine thread (`scheduler.py`, continuous batching); the event
loop only parses, formats and streams. A client that disconnects cancels its sequences, which
frees their batch rows before the next decode step.

fastapi is imported inside the functions that build the app only, so the CLI works without the
`serve` extra installed.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request) at run time
import asyncio
import time
import uuid

from ..errors import PoEError
from ..modes import MODES
from .metrics import CONTENT_TYPE, CountRequests, Metrics, register_http_metrics
from .protocol import ApiError, Assembly, CompletionJob, event_error, parse_body, parse_completion, sse
from .scheduler import QueueFull, Scheduler, SchedulerClosed
from .sequence import FAILED, Event

ROUTES = ("/v1/completions", "/v1/models", "/health", "/metrics", "/v1/chat/completions")
POLL = 0.25                # seconds between disconnect checks of a non-streaming request


def create_app(model, tokenizer, served_name: str = "poegpt", max_batch: int = 8, max_queue: int = 64,
               timeout: float | None = 600.0):
    """The FastAPI app serving `model` (eval mode) with `tokenizer` under `served_name`. The engine
    thread starts now and stops when the app's lifespan ends."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    if tokenizer.vocab_size < model.config.vocab_size:
        raise PoEError(f"the tokenizer has {tokenizer.vocab_size} ids but the model predicts "
                       f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    metrics = Metrics()
    scheduler = Scheduler(model, tokenizer, max_batch, max_queue, timeout, metrics).start()
    register_http_metrics(metrics)

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="poegpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    add_error_handlers(app)
    add_completions(app, model, tokenizer, served_name, scheduler, metrics)
    add_info_routes(app, model, served_name, scheduler, metrics)
    app.add_middleware(CountRequests, metrics=metrics, routes=ROUTES)
    return app


def add_error_handlers(app) -> None:
    """Every error in OpenAI's shape: ours, Starlette's 404/405, and a 500 for a bug."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

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


# ------------------------------------------------------------------------------------------------
# /v1/completions
# ------------------------------------------------------------------------------------------------

def add_completions(app, model, tokenizer, served_name: str, scheduler: Scheduler, metrics: Metrics) -> None:
    """POST /v1/completions (JSON or SSE) and the chat route's explanation."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.monotonic()
        job = parse_completion(parse_body(await request.body()), model, tokenizer, served_name)
        rid = f"cmpl-{uuid.uuid4().hex}"
        seqs, queue = submit(scheduler, metrics, job, rid)
        out = Assembly(job, rid, served_name)

        def finished():
            scheduler.cancel(seqs)      # no-op for finished sequences; frees the rows of a departed client
            metrics.observe("poegpt_request_latency_seconds", time.monotonic() - t0, mode=job.spec.mode)

        if job.stream:
            return StreamingResponse(stream_events(out, queue, finished), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            if not await collect_events(request, out, queue):
                return Response(status_code=499)   # nobody to answer; the rows are freed below
        finally:
            finished()
        return JSONResponse(out.response())

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat_completions():
        raise ApiError(400, "this model has no chat template, so /v1/chat/completions is not available; "
                            "use POST /v1/completions with a plain-text prompt")


def submit(scheduler: Scheduler, metrics: Metrics, job: CompletionJob, rid: str):
    """Queue a job's sequences on the engine: (the sequences, the asyncio queue their events arrive on)."""
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
    return seqs, queue


async def stream_events(out: Assembly, queue: asyncio.Queue, finished):
    """The SSE body: a chunk per event that tells something, the usage chunk if asked, [DONE]; a failed
    sequence ends the stream with its error."""
    try:
        while not out.done:
            ev = await queue.get()
            if ev.finish_reason in FAILED:
                yield sse(event_error(ev).body())
                break
            chunk = out.chunk(ev)
            if chunk:
                yield chunk
        else:
            if out.job.include_usage:
                yield out.usage_chunk()
        yield "data: [DONE]\n\n"
    finally:                 # also runs when the client disconnects and the task is cancelled
        finished()


async def collect_events(request, out: Assembly, queue: asyncio.Queue) -> bool:
    """Gather every event of a non-streaming request into `out`; False when the client went away
    (checked every POLL seconds, whether or not events keep coming). A failed sequence raises its error."""
    check_at = time.monotonic() + POLL
    while not out.done:
        try:
            ev = await asyncio.wait_for(queue.get(), POLL)
        except asyncio.TimeoutError:
            ev = None
        if time.monotonic() >= check_at:
            check_at = time.monotonic() + POLL
            if await request.is_disconnected():
                return False
        if ev is None:
            continue
        if ev.finish_reason in FAILED:
            raise event_error(ev)
        out.add(ev)
    return True


# ------------------------------------------------------------------------------------------------
# /v1/models, /health, /metrics
# ------------------------------------------------------------------------------------------------

def model_card(model, served_name: str, created: int) -> dict:
    cfg = model.config
    return {"id": served_name, "object": "model", "created": created, "owned_by": "poegpt",
            "max_model_len": cfg.sequence_len,
            "poe": {"n_stages": cfg.n_stages, "n_layer": cfg.n_layer, "boundaries": list(cfg.boundaries),
                    "modes": list(MODES), "batched_modes": list(MODES),
                    "wand_calibrated": model.calibration.wand_p99_bounds is not None}}


def add_info_routes(app, model, served_name: str, scheduler: Scheduler, metrics: Metrics) -> None:
    """GET /v1/models (and one model), /health (503 while draining or once the engine stopped), /metrics."""
    from fastapi.responses import JSONResponse, Response

    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(model, served_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != served_name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {served_name!r}", "model",
                           code="model_not_found")
        return model_card(model, served_name, created)

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
        return Response(metrics.render(), media_type=CONTENT_TYPE)
