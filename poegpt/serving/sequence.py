"""What passes between the HTTP side of `poegpt serve` and its engine thread.

A request becomes sequences, one per prompt and choice (`SeqParams`: what to generate; `Sequence`:
its state on the engine thread), and each sequence sends `Event`s back through a callback: new
text, token ids and log-probs, and on its last event the finish reason and what its mode did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import Sampling
from ..modes import BatchRow, ModeSpec
from .logprobs import TokenLogprob
from ..textstream import TextStream

FAILED = ("timeout", "error", "shutdown")    # finish reasons that end a request with an error


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
        # its row of the shared cache
        self.row: BatchRow | None = None   # how its mode takes a token in the shared step
        self.generator: torch.Generator | None = None
        self.length = 0                    # tokens in its cache row
        self.pending: int | None = None    # the last token, fed at the next decode step
        self.gen = None                    # a non-static mode's counts (its report)
        self.alone = None                  # the mode's own cycles when the row runs alone (speculative)

    @property
    def mode(self) -> str:
        return self.params.spec.mode
