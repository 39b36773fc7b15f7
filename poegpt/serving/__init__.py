"""`poegpt serve`: an OpenAI-compatible HTTP server for PoE models with continuous batching
(docs/serving.md).

One concern per module:

    protocol.py     requests in (OpenAI completions fields + the mode table's PoE fields, ApiError)
                    and the completions JSON / SSE chunks out
    app.py          the FastAPI app: routes, error handlers (`create_app`)
    scheduler.py    the engine thread: queue, admission, one batched step for every mode (`Scheduler`)
    sequence.py     what passes between them: SeqParams, Sequence, Event
    logprobs.py     log-prob entries and prompt log-probs
    metrics.py      the Prometheus registry (`Metrics`) and every metric the server records
    launch.py       `poegpt serve`: arguments, loading while the port answers, SIGTERM drain
"""

from .app import create_app
from .launch import LoadingApp, add_serve_parser, cmd_serve
from .metrics import Metrics
from .protocol import ApiError, CompletionJob, parse_completion, parse_mode
from .scheduler import QueueFull, Scheduler, SchedulerClosed
from .sequence import FAILED, Event, SeqParams, Sequence
from ..textstream import TextStream

__all__ = ["create_app", "LoadingApp", "add_serve_parser", "cmd_serve", "Metrics", "ApiError", "CompletionJob",
           "parse_completion", "parse_mode", "QueueFull", "Scheduler", "SchedulerClosed", "FAILED", "Event",
           "SeqParams", "Sequence", "TextStream"]
