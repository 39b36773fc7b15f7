"""The cache contract (docs/design.md §8.1): one conformance test that every cache form passes, and
the contract's own rules on `KVCache`.

Conformance: each form in `FORMS` runs the same scenario on an fp64 tiny model. A batch (ragged,
rows of different lengths, where the form holds per-row lengths) is prefilled in chunks, then fed
token by token, through the trunk walk (`model.walk(idx, None, 0, K, pos, cache)`, then
`cache.advance(n)`); at every step each row's boundary states equal a no-cache forward of that
row's whole sequence to 1e-12, and `lengths` says what each row holds. The sequences run past the
short attention window, and a chunk that is wider than a row's share writes padding past the row's
end, which the next step overwrites. vLLM's paged cache takes each step as vLLM would (`PagedRequests`):
the rows with new tokens as requests of one flat batch, walked as one row (1, N) with per-token
positions against a `PagedCache` over a fake paged storage (tests/paged.py) that persists across steps.

Rules, on `KVCache`: lengths are read-only; `reset` / `advance` / `rollback` (a rolled-back row
rewritten with other tokens computes as if the rejected tokens never came); `rows` writes through to
the parent's rows only; `move_row`; room checks raise `PoEError`.
"""

import importlib.util
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from poegpt import PoEError
from poegpt.cache import KVCache, new_cache

from conftest import build_random_model
from paged import BLOCK, FakePagedCache

K = 4                  # stages of the tiny preset
TOL = 1e-12            # fp64: the cached and uncached paths agree to rounding
MAX_LEN = 40           # slots per row (the tiny context is 64)
PAD = 0                # the token a chunk's padding holds


@pytest.fixture(scope="module")
def model():
    return build_random_model(seed=8, dtype=torch.float64)


def sequences(lengths, seed=0, vocab=512) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def no_cache(model, seq: torch.Tensor) -> list[torch.Tensor]:
    """Boundary states [(T, d)] of one row's whole sequence, without a cache."""
    with torch.no_grad():
        return [h[0] for h in model.trunk(seq[None])]


def assert_states(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=TOL, msg=lambda m: f"{what}, stage {k}: {m}")


def feed(model, cache, rows: list[torch.Tensor], positions=None) -> list[list[torch.Tensor]]:
    """One step of the trunk walk: row r's new tokens rows[r] (a chunk right-padded to the widest),
    then advance each row by its own count. Returns each row's boundary states [(n_r, d)]."""
    counts = [len(r) for r in rows]
    T = max(counts)
    idx = torch.full((len(rows), T), PAD, dtype=torch.long)
    for r, toks in enumerate(rows):
        idx[r, :len(toks)] = toks
    pos = cache.positions(T, idx.device) if positions is None else positions(cache, T, idx.device)
    with torch.no_grad():
        _, outs = model.walk(idx, None, 0, K, pos, cache)
    cache.advance(counts[0] if len(set(counts)) == 1 else counts)
    return [[h[r, :n] for h in outs] for r, n in enumerate(counts)]


# --- the forms ----------------------------------------------------------------------------------------
@dataclass
class CacheForm:
    """One form of the cache contract: how to build it for (model, batch, max_len), whether its rows
    may hold different lengths, where a step's tokens go (default: `cache.positions`), and how a step
    is walked: `feed(model, cache, rows)` -> each row's boundary states (default: `feed`, (B, T))."""
    name: str
    make: Callable
    ragged: bool = True
    positions: Callable | None = None
    feed: Callable | None = None

    def step(self, model, cache, rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        if self.feed is not None:
            return self.feed(model, cache, rows)
        return feed(model, cache, rows, self.positions)


def row_view(model, batch, max_len):
    """Rows 1..batch of a cache two rows larger (the server's batch is such a view)."""
    return new_cache(model, batch + 2, max_len).rows(1, batch + 1)


def full_view(model, batch, max_len):
    cache = new_cache(model, batch, max_len)
    cache.full_view = True
    return cache


def device_positions(cache, T, device):
    """Per-row device positions even when rows are aligned, as the compiled steps pass them."""
    return torch.tensor(cache.lengths, device=device)[:, None] + torch.arange(T, device=device)


def transformers_view(model, batch, max_len, from_config=False):
    """The Hugging Face wrapper's view over a transformers DynamicCache (empty, or built from the config)."""
    from transformers import DynamicCache
    from poegpt.integrations.hf.remote.configuration_poegpt import PoEGPTConfig
    from poegpt.integrations.hf.remote.modeling_poegpt import CacheView
    dynamic = DynamicCache(config=PoEGPTConfig.from_poe_config(model.config)) if from_config else DynamicCache()
    return CacheView(dynamic, model.config.n_layer, batch)


class PagedRequests:
    """vLLM's paged cache (`PagedCache`, poegpt/integrations/vllm/trunk.py) under the scenario: the rows
    are vLLM requests whose keys, values and embeddings live in one fake paged storage (tests/paged.py,
    enough blocks for `max_len` tokens per row, handed out shuffled) kept across steps, as vLLM keeps
    its cache; a `PagedCache` lives for one forward. `lengths`: what each forward's cache says its
    requests hold after `advance` (a row with no tokens in a forward keeps its count)."""

    def __init__(self, model, batch: int, max_len: int):
        self.storage = FakePagedCache(model.config, model.config.n_layer, num_blocks=batch * -(-max_len // BLOCK),
                                      dtype=next(model.parameters()).dtype)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]   # each request's token ids so far
        self._lengths = [0] * batch
        self.order = random.Random(0)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    def feed(self, model, rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The scenario's (B, T) step as one vLLM forward: the rows with new tokens, in a shuffled order,
        their tokens concatenated and padded to the step's B · T (vLLM pads to a graph's size), per-token
        positions; a fresh `PagedCache` over the storage; `model.walk` over (1, N); the flat boundary
        states back to each row [(n_r, d)]."""
        step = [(r, len(self.tokens[r]), len(toks)) for r, toks in enumerate(rows) if len(toks)]
        self.order.shuffle(step)
        for r, toks in enumerate(rows):
            self.tokens[r] += toks.tolist()
        pad = len(rows) * max(len(t) for t in rows) - sum(n for _, _, n in step)
        ids, _, cache = self.storage.forward(step, self.tokens, pad=pad)
        assert cache.lengths == tuple(self._lengths[r] for r, _, _ in step)    # held before this forward
        with torch.no_grad():
            _, outs = model.walk(ids[None], None, 0, K, cache.positions(ids.numel(), ids.device), cache)
        cache.advance([n for _, _, n in step])
        states = [[h[0, :0] for h in outs] for _ in rows]
        for (r, _, n), a, held in zip(step, cache.batch.starts, cache.lengths):
            states[r] = [h[0, a:a + n] for h in outs]
            self._lengths[r] = held
        return states


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'poegpt[hf]')")

POEGPT_FORMS = [
    CacheForm("KVCache", new_cache),
    CacheForm("KVCache.rows", row_view),
    CacheForm("KVCache full_view", full_view, positions=device_positions),
]
HF_FORMS = [   # rows of a DynamicCache hold equal numbers of slots; padding is the wrapper's (tests/test_hf.py)
    CacheForm("transformers DynamicCache", transformers_view, ragged=False),
    CacheForm("transformers DynamicCache(config)", lambda m, b, n: transformers_view(m, b, n, from_config=True),
              ragged=False),
]
VLLM_FORMS = [  # no vLLM needed: its part is played on plain tensors (tests/paged.py)
    CacheForm("vLLM PagedCache", PagedRequests, feed=lambda model, requests, rows: requests.feed(model, rows)),
]

FORMS = [*(pytest.param(f, id=f.name) for f in POEGPT_FORMS),
         *(pytest.param(f, id=f.name, marks=needs_transformers) for f in HF_FORMS),
         *(pytest.param(f, id=f.name) for f in VLLM_FORMS)]


def chunks(prompt_lengths, width):
    """Prefill schedule: each step gives row r its next min(width, left) prompt tokens (0 once done)."""
    left, steps = list(prompt_lengths), []
    while any(left):
        step = [min(width, n) for n in left]
        left = [n - s for n, s in zip(left, step)]
        steps.append(step)
    return steps


@pytest.mark.parametrize("form", FORMS)
def test_cache_form_conforms(model, form):
    """Chunked prefill then one token at a time: boundary states equal a no-cache forward at every
    step, and `lengths` are the tokens each row holds (read-only)."""
    prompts = (20, 7, 13) if form.ragged else (20, 20, 20)
    n_decode = 12                                     # up to 32 tokens: past the short window of 16
    seqs = sequences([p + n_decode for p in prompts], seed=1)
    refs = [no_cache(model, s) for s in seqs]
    cache = form.make(model, len(prompts), MAX_LEN)
    assert cache.lengths == (0,) * len(prompts)
    held = [0] * len(prompts)
    for step, counts in enumerate(chunks(prompts, 8) + [[1] * len(prompts)] * n_decode):
        rows = [seqs[r][held[r]:held[r] + n] for r, n in enumerate(counts)]
        states = form.step(model, cache, rows)
        for r, n in enumerate(counts):
            assert_states(states[r], [h[held[r]:held[r] + n] for h in refs[r]], f"{form.name}, step {step}, row {r}")
            held[r] += n
        assert cache.lengths == tuple(held), (step, cache.lengths, held)
    assert held == [len(s) for s in seqs]
    with pytest.raises(AttributeError):
        cache.lengths = tuple(held)


# --- the contract's rules, on KVCache -------------------------------------------------------------------
def test_lengths_are_read_only(model):
    cache = new_cache(model, 2, 8)
    with pytest.raises(AttributeError):
        cache.lengths = (3, 3)
    with pytest.raises(TypeError):
        cache.lengths[0] = 3                          # a tuple, not the cache's own list
    assert cache.lengths == (0, 0)


def test_reset_and_advance(model):
    cache = new_cache(model, 3, 10)
    cache.advance(2)
    assert cache.lengths == (2, 2, 2) and cache.pos == 2
    cache.advance([1, 0, 3])
    assert cache.lengths == (3, 2, 5)
    with pytest.raises(PoEError, match="different lengths"):
        cache.pos
    assert cache.positions(2, "cpu").tolist() == [[3, 4], [2, 3], [5, 6]]
    cache.reset([4, 0, 10])
    assert cache.lengths == (4, 0, 10)
    cache.reset()
    assert cache.lengths == (0, 0, 0) and cache.positions(5, "cpu") == 0
    for bad in ([1, 2], [0, 0, 11], [-1, 0, 0]):
        with pytest.raises(PoEError, match="cache lengths must be"):
            cache.reset(bad)
    assert cache.lengths == (0, 0, 0)


def test_padded_prefill_then_reset_decodes_each_row_as_alone(model):
    """The engine's prefill: a right-padded batch from position 0, then `reset` to each row's prompt
    length; decoding on (trunk: positions, walk, advance) computes what each row computes alone."""
    prompts = (5, 9, 2)
    seqs = sequences([p + 9 for p in prompts], seed=2)
    cache = new_cache(model, 3, 20)
    width = max(prompts)
    idx = torch.stack([torch.cat([s[:p], torch.full((width - p,), PAD)]) for s, p in zip(seqs, prompts)])
    with torch.no_grad():
        model.walk(idx, None, 0, K, 0, cache)
    cache.reset(list(prompts))
    for step in range(9):
        tok = torch.stack([s[p + step:p + step + 1] for s, p in zip(seqs, prompts)])
        with torch.no_grad():
            hs = model.trunk(tok, cache=cache)
        for r, (s, p) in enumerate(zip(seqs, prompts)):
            want = [h[p + step:p + step + 1] for h in no_cache(model, s[:p + step + 1])]
            assert_states([h[r] for h in hs], want, f"step {step}, row {r}")
        assert cache.lengths == tuple(p + step + 1 for p in prompts)


def test_rollback_forgets_the_rejected_tokens(model):
    """Speculative decoding's rollback: a row rolled back and rewritten with other tokens computes as
    if the rejected tokens had never come, while the other row keeps its own."""
    prefix, drafts, rewrite, more = sequences([10, 10], seed=3), sequences([4, 4], seed=4), \
        sequences([3], seed=5)[0], sequences([3], seed=6)[0]
    cache = new_cache(model, 2, 24)
    feed(model, cache, prefix)
    feed(model, cache, drafts)
    assert cache.lengths == (14, 14)
    cache.rollback(0, 11)                             # row 0 keeps one draft, rejects three
    assert cache.lengths == (11, 14)
    got = feed(model, cache, [rewrite, more])
    row0 = torch.cat([prefix[0], drafts[0][:1], rewrite])
    row1 = torch.cat([prefix[1], drafts[1], more])
    assert_states(got[0], [h[11:] for h in no_cache(model, row0)], "rolled-back row")
    assert_states(got[1], [h[14:] for h in no_cache(model, row1)], "other row")
    assert cache.lengths == (14, 17)
    cache.rollback(1, 17)                             # keeping everything is allowed
    for row, length in ((0, 15), (1, -1)):
        with pytest.raises(PoEError, match="cannot roll row"):
            cache.rollback(row, length)
    assert cache.lengths == (14, 17)


def test_rows_write_through_to_the_parents_rows_only(model):
    """A row view shares the parent's storage for its rows and nothing else, and keeps its own
    lengths; a later view of a row resumes what an earlier one wrote."""
    parent = new_cache(model, 4, 16)
    for buf in (*parent.k, *parent.v, parent.embeds):
        buf.fill_(7.0)                                # what rows 0 and 3 must still hold afterwards
    first, rest = sequences([5, 5], seed=7), sequences([4], seed=8)[0]
    view = parent.rows(1, 3)
    got = feed(model, view, first)
    for r in range(2):
        assert_states(got[r], no_cache(model, first[r]), f"view row {r}")
    assert view.lengths == (5, 5) and parent.lengths == (0, 0, 0, 0)
    for layer in range(model.config.n_layer):
        assert torch.equal(parent.k[layer][1:3, :, :5], view.k[layer][:, :, :5])
        assert torch.equal(parent.v[layer][1:3, :, :5], view.v[layer][:, :, :5])
    assert torch.equal(parent.embeds[1:3, :5], view.embeds[:, :5])
    for buf in (*parent.k, *parent.v, parent.embeds):
        assert bool((buf[0] == 7.0).all()) and bool((buf[3] == 7.0).all())
    again = parent.rows(2, 3, [5])                    # parent row 2 = the first view's row 1
    got = feed(model, again, [rest])
    assert_states(got[0], [h[5:] for h in no_cache(model, torch.cat([first[1], rest]))], "resumed row")
    assert again.lengths == (9,) and view.lengths == (5, 5)


def test_move_row_copies_a_rows_tokens(model):
    """move_row(src, dst, n): row dst holds src's first n tokens and continues as src would."""
    seqs = sequences([6, 3, 8], seed=9)
    cache = new_cache(model, 3, 16)
    feed(model, cache, seqs)
    cache.move_row(2, 0, 8)
    assert cache.lengths == (8, 3, 8)
    for buf in (*cache.k, *cache.v):
        assert torch.equal(buf[0, :, :8], buf[2, :, :8])
    assert torch.equal(cache.embeds[0, :8], cache.embeds[2, :8])
    nxt, other = sequences([2], seed=10)[0], sequences([2], seed=11)[0]
    got = feed(model, cache, [nxt, other, nxt])
    want = [h[8:] for h in no_cache(model, torch.cat([seqs[2], nxt]))]
    assert_states(got[0], want, "moved row")
    assert_states(got[2], want, "source row")
    assert_states(got[1], [h[3:] for h in no_cache(model, torch.cat([seqs[1], other]))], "untouched row")


def test_room_checks_raise(model, tiny_cfg):
    with pytest.raises(PoEError, match="cannot exceed the context of 64"):
        KVCache(tiny_cfg, 1, 65)
    cache = new_cache(model, 1, 10)
    feed(model, cache, sequences([8]))
    with pytest.raises(PoEError, match="exceeds the KV cache of 10"):
        feed(model, cache, sequences([3]))            # aligned rows: an int position
    assert cache.lengths == (8,)                      # nothing advanced
    ragged = new_cache(model, 2, 10)
    ragged.reset([9, 2])
    with pytest.raises(PoEError, match="exceeds the KV cache of 10"):
        feed(model, ragged, sequences([2, 2]))        # per-row positions: row 0 would end at 11
    assert ragged.lengths == (9, 2)
    with pytest.raises(PoEError, match="cache lengths must be"):
        ragged.reset([11, 0])
