"""`poegpt serve`: the launcher of the OpenAI-compatible server (docs/design.md §10.2).

    poegpt serve --model RUN --port 8000 --served-name poegpt-demo
    curl -X POST http://localhost:8000/v1/completions -H "Content-Type: application/json" \\
         --data '{"model": "poegpt-demo", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}'

The port answers while the checkpoint loads (`LoadingApp`: /health 503 "loading", then 200), and the
server drains on SIGTERM: the socket closes, in-flight requests finish (for up to --drain-timeout
seconds), the process exits with status 0. uvicorn is imported inside `cmd_serve` only, so the CLI
works without the `serve` extra installed.
"""

import json
import os
import socket
import sys
import threading
from typing import Callable

from ..errors import PoEError
from ..hardware import resolve_dtype, set_threads
from .app import create_app
from .protocol import ApiError


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


def check_serve_args(a) -> None:
    """One PoEError line for a bad flag, before anything is loaded or bound."""
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


def listen(host: str, port: int) -> socket.socket:
    """The bound listening socket (port 0: any free port), or one PoEError line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on connections of a socket whose proto says
    # TCP, and without it Nagle holds every second write of a response (each SSE chunk after the first)
    # until the client's delayed ACK, about 40 ms on Linux
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PoEError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") \
            from None
    return sock


def draining_server(uvicorn, config, app: LoadingApp, drain_timeout: float):
    """uvicorn's server with a drain: the first SIGTERM / SIGINT stops the listening socket (uvicorn)
    and new requests (the scheduler answers 503), lets the in-flight ones finish for up to
    `drain_timeout` seconds, ends the rest with a shutdown error, then exits with status 0."""
    import contextlib

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if not first:
                return
            # a signal handler: no printing through sys.stderr (it may be mid-write), no locks
            os.write(2, f"poegpt: draining: in-flight requests may run for up to {drain_timeout:g} s; new "
                        f"requests are refused\n".encode())
            if app.app is not None:
                scheduler = app.app.state.scheduler
                scheduler.drain()
                timer = threading.Timer(drain_timeout, scheduler.abort)
                timer.daemon = True
                timer.start()

        if hasattr(uvicorn.Server, "capture_signals"):
            @contextlib.contextmanager
            def capture_signals(self):
                with super().capture_signals():
                    yield
                    # drained: exit normally rather than re-raise the signal (status 0, not -15)
                    getattr(self, "_captured_signals", []).clear()

    return Server(config)


def cmd_serve(a) -> None:
    try:
        import uvicorn
        import fastapi  # noqa: F401
    except ImportError:
        raise PoEError("poegpt serve needs fastapi and uvicorn: pip install 'poegpt[serve]'") from None
    from ..checkpoint import load_model, resolve_checkpoint
    check_serve_args(a)
    if a.threads is not None:
        set_threads(a.threads)
    resolve_checkpoint(a.model)            # a missing checkpoint is one line now, not after the server started
    sock = listen(a.host, a.port)
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

    def failed(message: str) -> None:
        server.should_exit = True

    app = LoadingApp(load, failed)
    # uvicorn's own limit is a backstop: the scheduler ends what is left at --drain-timeout
    config = uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=a.drain_timeout + 5)
    server = draining_server(uvicorn, config, app, a.drain_timeout)
    print(f"poegpt: loading {name!r}; http://{host}:{port}/health answers 503 until it is ready", file=sys.stderr,
          flush=True)
    server.run(sockets=[sock])
    if app.error is not None:
        raise PoEError(app.error)
    print("poegpt: stopped", file=sys.stderr, flush=True)
