"""The generation engine: prefill into a preallocated KV cache, then decode one token at a time.

One loop serves the four static PoE modes — full, prefix, single stage, weighted composition —
which differ only in which stages they combine (docs/design.md §7): a `StageMix` names the stages and their
weights, and the loop runs the trunk only to the deepest selected boundary. WAND (`wand.py`) and
self-speculative decoding (`speculative.py`) use the same cache, sampling and row bookkeeping.

Batches of prompts of different lengths are right-padded for the prefill, after which every row
decodes at its own position (the cache keeps per-row lengths), so each row computes exactly what it
would alone. Sampling: greedy, or temperature / top-k / top-p with a seeded generator. Rows that
emit EOS stop; text-level stop strings and streaming live in `textstream.py`.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import PoEError
from .logop import logop, normalise_weights
from .cache import KVCache, new_cache


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise PoEError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise PoEError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise PoEError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(int(self.seed))


@dataclass(frozen=True)
class StageMix:
    """Which stages a static mode combines, with Log-OP weights (None = uniform) or entropy alpha."""
    stages: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    alpha: float = 0.0

    @property
    def depth(self) -> int:
        """How many stages of the trunk must run: up to the deepest selected one."""
        return max(self.stages) + 1

    @classmethod
    def full(cls, K: int, alpha: float = 0.0) -> "StageMix":
        return cls(tuple(range(K)), None, alpha)

    @classmethod
    def prefix(cls, K: int, max_stages) -> "StageMix":
        if isinstance(max_stages, bool) or not isinstance(max_stages, int) or not 1 <= max_stages <= K:
            raise PoEError(f"max_stages must be an integer in 1..{K}, got {max_stages!r}")
        return cls(tuple(range(max_stages)))

    @classmethod
    def single(cls, K: int, stage) -> "StageMix":
        check_stage(stage, K, "stage")
        return cls((stage,))

    @classmethod
    def composition(cls, K: int, stages, stage_weights=None) -> "StageMix":
        if stages is None or len(stages) == 0:
            raise PoEError("stages is empty; select at least one stage to compose")
        for s in stages:
            check_stage(s, K, "stages")
        if len(set(stages)) != len(stages):
            raise PoEError(f"stages has duplicates: {list(stages)}; list each stage once")
        weights = None if stage_weights is None else tuple(normalise_weights(stage_weights, len(stages)))
        return cls(tuple(stages), weights)

    def logprobs(self, model, hs: list[torch.Tensor], heads: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Log-OP log-probs (..., V) of the selected stages from the trunk's boundary states
        (`heads`: the selected stages' summed head weights, when the caller holds them)."""
        heads = [None] * len(self.stages) if heads is None else heads
        logps = {k: F.log_softmax(model.stage_logits(hs[k], k, w), -1) for k, w in zip(self.stages, heads)}
        return self.combine(logps)

    def combine(self, logps) -> torch.Tensor:
        """Log-OP of the selected stages from per-stage log-probs (indexed by stage: a list or a dict)."""
        return logop([logps[k] for k in self.stages], self.weights, self.alpha if self.weights is None else 0.0)


def check_stage(stage, K: int, name: str) -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < K:
        raise PoEError(f"{name} must be integers in 0..{K - 1}, got {stage!r}")


def to_rows(ids) -> list[list[int]]:
    """Prompts as lists of token ids: from a (B, T) tensor or a list of lists (any lengths)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise PoEError("ids must be a (batch, length) integer tensor of token ids")
        return ids.tolist()
    rows = [list(r) for r in ids]
    if not rows:
        raise PoEError("no prompts given")
    return rows


def check_prompts(model, rows: list[list[int]], max_new_tokens) -> None:
    ctx, V = model.config.sequence_len, model.config.vocab_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PoEError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for r in rows:
        if len(r) == 0:
            raise PoEError("the prompt is empty; give at least one token (encode() prepends <|bos|>)")
        if min(r) < 0 or max(r) >= V:
            raise PoEError(f"token ids must be in 0..{V - 1}")
        if len(r) + max_new_tokens > ctx:
            raise PoEError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{len(r) + max_new_tokens} tokens ({len(r)} in the prompt, {max_new_tokens} for the "
                           f"completion). Please reduce the prompt or max_new_tokens.")


def filter_logprobs(logp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of log-probs (B, V); returns log-probs."""
    logp = F.log_softmax(logp / temperature, dim=-1)
    if top_k is not None and top_k < logp.size(-1):
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_lp.exp()
        drop = probs.cumsum(-1) - probs >= top_p                    # mass strictly above the token
        drop[..., 0] = False                    # the top token always stays (top_p may underflow to 0 here)
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    return F.log_softmax(logp, dim=-1)


def sampling_logprobs(logp: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution the sampler draws from (after filtering)."""
    return filter_logprobs(logp, sampling.temperature, sampling.top_k, sampling.top_p)


def pick(logp: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from log-probs (B, V): argmax when greedy, else a draw from the filtered distribution."""
    if sampling.greedy:
        return logp.argmax(-1)
    probs = sampling_logprobs(logp, sampling).exp()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextmanager
def one_row_matmuls(model, rows: int):
    """Run a step whose matmuls have a single row (batch 1, one token) on ATen's own bf16 GEMV.

    On CPU, oneDNN's bf16 matmul costs ~20-30 µs per call before any work at M = 1, and streams a
    large matrix at about half the rate of ATen's GEMV: measured here 2-3x slower on the demo
    model's 256-wide matrices and ~2x on the 1.5B preset's MLP and head (docs/benchmarks.md). From
    two rows on oneDNN wins, so only one-row steps switch. Part of the fast path (`compile_decode`)
    only: the two kernels round bf16 differently, and the default path keeps oneDNN's rounding, the
    one transformers and vLLM use, so that their greedy tokens equal poegpt's. The switch is
    process-global (torch has no per-call choice), so it is held for the step only, never across a
    yield."""
    p = model.lm_head.weight
    if (rows != 1 or p.device.type != "cpu" or p.dtype != torch.bfloat16 or not torch._C._get_mkldnn_enabled()
            or fast_path(model) is None):
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


class DecodeStep:
    """The one-token step of a static mode at fixed shapes, for `torch.compile` (gpt-fast style).

    It owns a preallocated cache of `max_len` slots in full-view mode: each row writes its token at
    its own position (a device tensor, advanced on the device) and attends over every slot under a
    position mask, so the shapes never change and nothing is read back to the host. The summed
    stage-head weights are taken once. The compiled graph is reused by every generation with the
    same (mode, batch, cache size, dtype): `decode_step` keeps the steps of a model in a small LRU.
    Prefill runs eagerly into the same cache.

    `head(hs, heads, *args)` turns the walked stages' boundary states [(B, d)] into the step's output
    (default: the mix's Log-OP log-probs); WAND's deep step gives its exit rule here, with its
    thresholds as an extra tensor argument. `full_view=False` with compiler None is the same step on
    an ordinary cache (an int position when the rows are aligned: the eager engine's attention)."""

    def __init__(self, model, mix: StageMix, batch: int, max_len: int, compiler: "Compiler | None",
                 head=None, full_view: bool = True):
        self.model, self.mix = model, mix
        self.cache = new_cache(model, batch, max_len)
        self.cache.full_view = full_view
        self.heads = [model.head_weight(k) for k in mix.stages]
        self.head = head if head is not None else (lambda hs, heads: mix.logprobs(model, hs, heads))
        self.fn = compiled(self._step, compiler)

    def _step(self, tok: torch.Tensor, pos, *args):
        _, hs = self.model.walk(tok[:, None], None, 0, self.mix.depth, pos if isinstance(pos, int) else pos[:, None],
                                self.cache)
        return self.head([h[:, -1] for h in hs], self.heads, *args)

    def __call__(self, tok: torch.Tensor, pos, *args) -> torch.Tensor:
        """The step's output (default: log-probs (B, V)) after feeding token tok[b] at position pos[b] of
        each row (pos: (B,), or an int when every row is at the same position and the cache is not full view)."""
        return self.fn(tok, pos, *args)


@dataclass(frozen=True)
class Compiler:
    """How the fast path compiles a step: `torch.compile(backend=...)` at fixed shapes. `autotune`
    (inductor): max_autotune (GEMM templates benchmarked per shape) and freezing (weights folded in as
    constants, pre-packed): on the demo model in bf16, one thread, the AVX512_BF16 host, a plain step
    2.43 -> 1.67 ms, a stage-0 draft pass 0.97 -> 0.65, a 4-position verify 2.37 -> 1.44, for ~10x
    the compile time per step shape (79 s vs 8 s for seven passes, cold). A frozen step holds its
    weights: it is built again when they change (`cached_step` keys on their versions)."""
    backend: str = "inductor"
    autotune: bool = False

    def __post_init__(self):
        if self.autotune and self.backend != "inductor":
            raise PoEError(f"autotune is inductor's max_autotune and freezing; it needs backend 'inductor', "
                           f"got {self.backend!r}")

    def __call__(self, fn):
        options, config = None, {}
        if self.backend == "inductor":
            # emulate_precision_casts: fused bf16 element-wise chains round where eager rounds, so compiled
            # greedy tokens equal eager ones in bf16 too (without it 1 of 8 demo prompts drifts; ~8 % slower)
            options = {"emulate_precision_casts": True}
            if self.autotune:
                options["max_autotune"] = True
                # freezing is read outside the per-compile options (given there it is silently not
                # applied: measured, the passes' times did not move): set around the calls that compile
                config = {"freezing": True}
        return Compiled(torch.compile(fn, backend=self.backend, dynamic=False, options=options), config)


def compiled(fn, compiler: Compiler | None):
    """`fn` compiled by `compiler` (None: `fn` itself, the same step eager)."""
    return fn if compiler is None else compiler(fn)


def _signature(x):
    if isinstance(x, torch.Tensor):
        return x.shape, x.dtype, x.device
    if isinstance(x, (list, tuple)):
        return tuple(_signature(y) for y in x)
    return x


class Compiled:
    """A compiled step that, once an argument signature (shapes, dtypes, devices, plain values) has run,
    calls it again without dynamo's guard evaluation: the guards check every parameter and cache
    tensor the step reads, ~130 µs per call of a demo draft pass and ~240 µs of a full step (7-9 %
    of the call, measured on the Zen 4-class host), paid k+2 times per speculative cycle. Safe here
    because a step's shapes are fixed and its tensors are the same objects at every call; the
    first call of each signature runs with the guards (it compiles, or picks its graph among the
    other steps' of the same code), and a call that would need a new graph all the same runs
    again with them."""

    def __init__(self, fn, config: dict | None = None):
        self.fn, self.warm, self.config = fn, set(), config or {}

    def __call__(self, *args):
        sig = _signature(args)
        if sig in self.warm:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self.fn(*args)
            except RuntimeError as e:      # dynamo: "Recompilation triggered with skip_guard_eval_unsafe"
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        if self.config:                    # inductor settings for the calls that may compile
            import torch._inductor.config as inductor_config
            with inductor_config.patch(self.config):
                out = self.fn(*args)
        else:
            out = self.fn(*args)
        self.warm.add(sig)
        return out


STEP_SLOTS = 64     # cache sizes are rounded up to a multiple of this, so generations share compiled steps
MAX_STEPS = 8       # compiled steps kept per model


def step_slots(model, need: int) -> int:
    return min(model.config.sequence_len, -(-need // STEP_SLOTS) * STEP_SLOTS)


class FastPath:
    """A model's fast decode path: how its steps compile (None: the same fixed-shape steps eager, for
    tests) and its compiled steps, most recently used last."""

    def __init__(self, compiler: Compiler | None):
        self.compiler = compiler
        self.steps: dict[tuple, object] = {}


_FAST: "weakref.WeakKeyDictionary[torch.nn.Module, FastPath]" = weakref.WeakKeyDictionary()
_PARKED: "weakref.WeakKeyDictionary[torch.nn.Module, FastPath]" = weakref.WeakKeyDictionary()


def fast_path(model) -> FastPath | None:
    """The model's fast path when `compile_decode` turned it on, else None."""
    return _FAST.get(model)


def cached_step(model, key: tuple, build):
    """The model's step for `key`, built by `build(compiler)` on first use and kept in a small LRU. Built
    again when the weights change (the summed heads are taken at build time)."""
    fast = _FAST[model]
    p = model.lm_head.weight
    key = key + (p.dtype, p.device, tuple(w._version for w in model.parameters()))
    step = fast.steps.pop(key, None) or build(fast.compiler)
    fast.steps[key] = step                                   # most recently used last
    while len(fast.steps) > MAX_STEPS:
        fast.steps.pop(next(iter(fast.steps)))
    return step


def decode_step(model, mix: StageMix, batch: int, need: int) -> DecodeStep:
    """The model's compiled step for (mix, batch, a cache of >= need slots)."""
    max_len = step_slots(model, need)
    return cached_step(model, ("static", mix, batch, max_len),
                       lambda compiler: DecodeStep(model, mix, batch, max_len, compiler))


def compile_decode(model, enabled: bool = True, backend: str | None = "inductor", autotune: bool = False) -> None:
    """Decode the static modes (full, prefix, stage, composition) with the fixed-shape one-token step,
    self-speculative decoding with fixed-shape draft and verify passes, and WAND's deep steps, compiled by
    `torch.compile(backend=backend)` (None: the same steps uncompiled, for tests); `autotune`: inductor's
    max_autotune and freezing (see `Compiler`: passes 31-39 % faster, ~10x the compile time).
    Off by default: a step compiles in ~10-60 s on a 2-core CPU per (mode, batch, cache size), which
    pays off for long-running use (a server, benchmarks, long generations), not for one short call.
    See docs/benchmarks.md for compiled vs eager tokens/s per mode. Turning it off keeps the compiled
    steps aside: on again with the same compiler reuses them (a bench that times eager and compiled in
    turn compiles each shape once)."""
    fast = _FAST.pop(model, None) or _PARKED.pop(model, None)
    if not enabled:                 # parked: turning it on again with the same compiler reuses its steps
        if fast is not None:
            _PARKED[model] = fast
        return
    compiler = None if backend is None and not autotune else Compiler(backend, autotune)
    _FAST[model] = fast if fast is not None and fast.compiler == compiler else FastPath(compiler)
    if compiler is not None:   # every (mode, batch, cache size) is one more graph of the same step
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * MAX_STEPS)


def prefill(model, cache: KVCache, rows: list[list[int]], n_stages: int) -> list[torch.Tensor]:
    """Run the prompts (right-padded) through the first n stages; boundary states at each row's last token."""
    device = model.rope_cos.device
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
    cache.reset()                                 # from the start, also when the cache is reused
    _, hs = model.walk(idx, None, 0, n_stages, 0, cache)
    cache.reset([len(r) for r in rows])           # padding positions are beyond each row's end: never seen
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    rows_ix = torch.arange(len(rows), device=device)
    return [h[rows_ix, last] for h in hs]


@dataclass
class Generation:
    """What a generation produced, per row: new token ids, and for some modes per-token extras."""
    tokens: list[list[int]]
    stages_used: list[list[int]] | None = None       # WAND: the stage that emitted each token
    accepted: int = 0                                 # speculative: accepted draft tokens
    drafted: int = 0                                  # speculative: drafted tokens
    passes: int = 0                                   # speculative: verification passes
    extra: dict = field(default_factory=dict)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def decode_static(model, rows: list[list[int]], mix: StageMix, max_new_tokens: int, sampling: Sampling,
                  eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) at each step; rows past EOS keep yielding EOS."""
    check_prompts(model, rows, max_new_tokens)
    if max_new_tokens == 0:
        return
    device = model.rope_cos.device
    B = len(rows)
    need = max(len(r) for r in rows) + max_new_tokens
    fast = decode_step(model, mix, B, need) if fast_path(model) is not None else None
    cache = fast.cache if fast is not None else new_cache(model, B, need)
    heads = [model.head_weight(k) for k in mix.stages]       # summed once for the whole generation
    generator = sampling.generator(device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logp = mix.logprobs(model, prefill(model, cache, rows, mix.depth), heads)
    pos = torch.tensor(cache.lengths, device=device)          # each row's next position, kept on the device
    for step in range(max_new_tokens):
        nxt = pick(logp, sampling, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        yield nxt
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            return
        with one_row_matmuls(model, B):
            if fast is not None:
                logp = fast(nxt, pos)
                pos = pos + 1
            else:
                logp = mix.logprobs(model, [h[:, -1] for h in model.trunk(nxt[:, None], mix.depth, cache)], heads)


def as_output(ids, gen: Generation, pad_token_id: int | None = None) -> torch.Tensor:
    """HF-style (B, T + new) output: prompt then new tokens, right-padded with pad (or EOS) when rows differ."""
    rows = to_rows(ids)
    seqs = [r + t for r, t in zip(rows, gen.tokens)]
    width = max(len(s) for s in seqs)
    pad = 0 if pad_token_id is None else pad_token_id
    device = ids.device if isinstance(ids, torch.Tensor) else None
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
