"""Incremental detokenising of generated sequences, for `poegpt serve` and `poegpt generate --stream`.

A streamed completion must never show half a character, and a stop string must end its sequence
as soon as it appears (so that its batch row is freed at once), with the stop string and all after
it cut from the text. `TextStream` does both, token by token, on the tokenizer's streaming decoder.
"""

from __future__ import annotations


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


def stream_text(tokenizer, token_steps, n_rows: int, stop=(), eos_token_id: int | None = None):
    """Per-step new tokens (a list per row) as per-row text: yields (row, text, finish_reason), one
    `TextStream` per row. A row ends at EOS or a stop string (reason "stop") or when the steps run
    out (reason "length", with what was held back)."""
    streams = [TextStream(tokenizer, stop, eos_token_id) for _ in range(n_rows)]
    finished = [False] * n_rows
    for step in token_steps:
        for r, new in enumerate(step):
            for t in new:
                if finished[r]:
                    break
                delta, reason = streams[r].push(int(t))
                if reason is not None:
                    finished[r] = True
                    yield r, delta, reason
                elif delta:
                    yield r, delta, None
        if all(finished):
            return
    for r in range(n_rows):
        if not finished[r]:
            yield r, streams[r].finish(), "length"
