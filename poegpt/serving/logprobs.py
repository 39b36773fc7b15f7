"""Log-probs for `poegpt serve`'s `logprobs` and `echo` fields, in the completions API's shape.

A token's log-prob entry holds its name, its log-prob and the top-N alternatives (`Logprobs.entry`).
Every row of the server's batch has its distribution at hand when it takes a token: its mode's
`BatchRow` mix (a static mode's own; for WAND and speculative decoding the distribution they target,
full PoE or stage K-1 for the dense verifier). Prompt log-probs (echo with logprobs) come from one pass over the
prompt under the sequence's own mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import StageMix


@dataclass
class TokenLogprob:
    token: str                          # the token's own text (one token may hold part of a character)
    logprob: float | None               # None for the first prompt token, which has no prediction
    top: dict[str, float] | None
    offset: int                         # where its text starts in the completion (or prompt) text


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


class Logprobs:
    """Log-prob entries of one model and tokenizer (every token's name is made once)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.names = [token_text(tokenizer, i) for i in range(tokenizer.vocab_size)]

    def entry(self, token: int, logp: torch.Tensor, n: int, offset: int) -> TokenLogprob:
        """`token`'s entry under the distribution `logp` (V,), with the top `n` alternatives."""
        top = {}
        if n > 0:
            values, ids = torch.topk(logp, min(n, logp.numel()))
            top = {self.names[i]: _finite(v) for v, i in zip(values.tolist(), ids.tolist())}
        return TokenLogprob(self.names[token], _finite(float(logp[token])), top, offset)

    def prompt(self, prompt: list[int], mix: StageMix | None, n: int) -> list[TokenLogprob]:
        """Log-probs of each prompt token given the ones before, under the sequence's own `mix`
        (for the solo modes the one their tokens follow or approximate; None: full PoE)."""
        model, cfg = self.model, self.model.config
        mix = mix or StageMix.full(cfg.n_stages, cfg.poe_alpha)
        logp = mix.logprobs(model, model.trunk(torch.tensor([prompt], device=model.rope_cos.device), mix.depth))[0]
        decoder, offset, out = self.tokenizer.stream_decoder(), 0, []
        for i, t in enumerate(prompt):
            if i == 0:
                out.append(TokenLogprob(self.names[t], None, None, 0))
            else:
                out.append(self.entry(t, logp[i - 1], n, offset))
            offset += len(decoder.push(t))
        return out
