"""Generation: prefill the prompt into a preallocated KV cache, then decode one token at a time.

Each step evaluates the stages, combines them with Log-OP (SPEC §2) and picks the next token:
argmax when greedy, else a draw from the temperature / top-k / top-p filtered distribution using
a seeded generator. Rows that emit EOS keep emitting EOS; generation stops when all rows have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import PoEError
from .logop import logop
from .model import KVCache


def check_generation_args(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                          top_k: int | None = None, top_p: float | None = None) -> None:
    ctx = model.config.sequence_len
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise PoEError("ids must be a (batch, length) integer tensor of token ids")
    if ids.size(1) == 0:
        raise PoEError("the prompt is empty; give at least one token (encode() prepends <|bos|>)")
    if ids.numel() and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise PoEError(f"token ids must be in 0..{model.config.vocab_size - 1}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PoEError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if ids.size(1) + max_new_tokens > ctx:
        raise PoEError(f"This model's maximum context length is {ctx} tokens; the prompt has {ids.size(1)} and "
                       f"max_new_tokens asks {max_new_tokens} more. Shorten the prompt or max_new_tokens.")
    if not (temperature >= 0):
        raise PoEError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise PoEError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise PoEError(f"top_p must be in (0, 1], got {top_p}")


def filter_logprobs(logp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature then top-k then top-p (nucleus) filtering of log-probs (B, V); returns log-probs."""
    logp = F.log_softmax(logp / temperature, dim=-1)
    if top_k is not None and top_k < logp.size(-1):
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()         # mass strictly above each token
        drop = before >= top_p                                        # the top token always stays
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    return F.log_softmax(logp, dim=-1)


def pick_token(logp: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from full-distribution log-probs (B, V)."""
    if not do_sample or temperature == 0:
        return logp.argmax(-1)
    probs = filter_logprobs(logp, temperature, top_k, top_p).exp()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | None = None, n_stages: int | None = None) -> torch.Tensor:
    """Full-PoE (or first-n-stages prefix PoE) generation with a KV cache: (B, T) -> (B, T + new)."""
    check_generation_args(model, ids, max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    B, T = ids.shape
    device = ids.device
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, T + max_new_tokens, dtype=dtype, device=device)
    generator = make_generator(seed, device)
    out = ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids = ids
    for _ in range(max_new_tokens):
        hs = model.trunk(step_ids, n_stages, cache)
        logps = [F.log_softmax(model.stage_logits(h[:, -1], k), -1) for k, h in enumerate(hs)]
        nxt = pick_token(logop(logps, alpha=cfg.poe_alpha), do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_ids = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return out
