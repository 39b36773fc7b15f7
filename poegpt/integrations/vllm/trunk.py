"""The math of poegpt's vLLM model, in plain PyTorch: no vLLM import (docs/vllm.md).

The served model *is* a `PoEModel`, driven through its own trunk walk; what vLLM changes is only
where keys, values and embeddings live. vLLM hands a model one flat batch of tokens (prefill chunks
and decode steps of many requests, one after another) and keeps every layer's keys and values in a
paged cache: fixed-size blocks, a block table per request, a slot per token. `PagedCache` is poegpt's
cache contract (`poegpt/cache.py`) over that cache for one forward: it stores the batch's keys,
values and normed token embeddings at their slots, reads each token's predecessor's embedding (the
smear gate) through its request's block table, and takes over attention (`attend`), which over a
flat batch is per request: each request's queries against its own keys, gathered from its blocks,
through the model's own `CausalSelfAttention.attend` (or vLLM's fused kernel when asked).

Also here: the served variant read from the mode table (`served_mix`), the model that builds only
the layers and heads that variant runs (`served_model`), weight loading with poegpt's names, and the
forward / logits pair vLLM calls. tests/test_vllm_math.py checks all of it but vLLM's own kernel
against `PoEModel` on each request alone, on a fake paged cache, without vLLM; tests/test_vllm.py
runs the real thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...cache import RowLengths
from ...config import PoEConfig
from ...engine import StageMix
from ...errors import PoEError
from ...model import PoEModel, rotary_tables
from ...modes import MODES, ModeSpec

WEIGHT_PREFIX = "model."       # the checkpoint's names: the HF wrapper's `model.` + poegpt's own
OVERRIDE_PREFIX = "poe_"       # a served variant's config key: "poe_" + a field of a batched mode
ATTENTION_KERNELS = ("sdpa", "vllm")


# --- which model is served ---------------------------------------------------------------------------
def poe_config(hf_config) -> PoEConfig:
    to_poe = getattr(hf_config, "to_poe_config", None)
    if to_poe is None:
        raise PoEError(f"the config of this folder is a {type(hf_config).__name__}, not poegpt's PoEGPTConfig; "
                       "is poegpt's vLLM plugin installed (pip install 'poegpt[vllm]')?")
    return to_poe()


def override_keys() -> dict[str, list[str]]:
    """Each batched mode of the mode table that takes fields -> its config keys (`poe_<field>`)."""
    return {m.name: [OVERRIDE_PREFIX + f.name for f in m.fields] for m in MODES.values() if m.static and m.fields}


def served_mix(hf_config, cfg: PoEConfig) -> StageMix:
    """The static stage mix this served model computes: the batched mode of the mode table whose
    fields the config sets as `poe_<field>` (`--hf-overrides`), or full PoE when it sets none."""
    keys = override_keys()
    given = {}
    for key in {k for ks in keys.values() for k in ks}:
        value = getattr(hf_config, key, None)
        if value is not None:
            given[key[len(OVERRIDE_PREFIX):]] = value
    modes = [m for m, ks in keys.items() if {OVERRIDE_PREFIX + f for f in given} <= set(ks)] if given else ["full"]
    if len(modes) != 1:
        choices = "; ".join(f"{m}: {', '.join(ks)}" for m, ks in keys.items())
        raise PoEError(f"the config sets {', '.join(sorted(OVERRIDE_PREFIX + f for f in given))}, which select no "
                       f"single mode; give the keys of one ({choices})")
    spec = ModeSpec(modes[0], **given)
    if spec.mode == "prefix" and spec.max_stages == cfg.n_stages:
        spec = ModeSpec("full")        # a prefix of every stage is served as full PoE (poe_alpha applies)
    return spec.entry.mix(spec, cfg)


def attention_kernel(hf_config) -> str:
    """"sdpa" (poegpt's own attention per request, the default) or "vllm" (vLLM's fused kernel)."""
    kernel = getattr(hf_config, "poe_attention", None) or "sdpa"
    if kernel not in ATTENTION_KERNELS:
        raise PoEError(f"poe_attention must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    return kernel


def served_model(cfg: PoEConfig, depth: int) -> PoEModel:
    """A `PoEModel` with only the layers and stage heads of the first `depth` stages: the rest is not
    built (no weights, no KV cache, no compute). Made on the meta device, then given uninitialised
    storage on the current default device and dtype (vLLM's, while it builds a model): the weights
    are loaded. The config is the whole model's, so windows, value embeddings and the backout layer
    are those of the full trunk."""
    device = torch.empty(0).device
    with torch.device("meta"):
        model = PoEModel(cfg)
    n_layers = cfg.boundaries[depth - 1] + 1
    model.blocks = nn.ModuleList(model.blocks[:n_layers])
    model.value_embeds = nn.ModuleDict({k: v for k, v in model.value_embeds.items() if int(k) < n_layers})
    model.lm_head_stages = nn.ModuleList(model.lm_head_stages[:depth])
    model.to_empty(device=device)
    cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base, device=device)
    dtype = model.wte.weight.dtype     # poegpt's tables follow the model's dtype (`PoEGPT.to(dtype)`)
    model.rope_cos, model.rope_sin = cos.to(dtype), sin.to(dtype)
    return model.eval()


def builds(model: PoEModel, name: str) -> bool:
    """Whether the served model builds checkpoint tensor `name` (poegpt's name)."""
    parts = name.split(".")
    if parts[0] in ("blocks", "value_embeds"):
        return int(parts[1]) < len(model.blocks)
    if parts[0] == "lm_head_stages":
        return int(parts[1]) < len(model.lm_head_stages)
    return True


def load_weights(model: PoEModel, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy checkpoint tensors (`model.` + poegpt's names) into the served model, skipping the layers
    and heads it does not build; returns the names loaded."""
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if not name.startswith(WEIGHT_PREFIX):
            raise PoEError(f"unexpected tensor {name!r} in the checkpoint; was the folder written by poegpt export-hf?")
        key = name[len(WEIGHT_PREFIX):]
        if not builds(model, key):
            continue            # a layer or head beyond the stages this model serves
        param = params.get(key)
        if param is None or param.shape != tensor.shape:
            raise PoEError(f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit this model "
                           f"({None if param is None else tuple(param.shape)}); the folder does not match its config")
        param.data.copy_(tensor)
        loaded.add(name)
    return loaded


# --- vLLM's batch and paged cache, as plain tensors -----------------------------------------------------
@dataclass
class FlatBatch:
    """One forward's tokens as vLLM schedules them: request r owns tokens starts[r]..starts[r+1]-1 of
    the batch (a prefill chunk or a decode step), which end at position seq_lens[r]-1. `pos` and `req`
    give each of the batch's real tokens its position and request (vLLM may pad its input past them)."""
    starts: list[int]
    seq_lens: list[int]
    pos: torch.Tensor
    req: torch.Tensor

    @classmethod
    def make(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, positions: torch.Tensor,
             n: int) -> "FlatBatch":
        """From vLLM's attention metadata: query start locations, sequence lengths, the forward's
        positions and its number of real tokens."""
        num = seq_lens.numel()
        qsl = query_start_loc[: num + 1].to(torch.long)
        req = torch.repeat_interleave(torch.arange(num, device=positions.device), qsl.diff(), output_size=n)
        return cls(qsl.tolist(), seq_lens.tolist(), positions[:n].to(torch.long), req)

    @property
    def n(self) -> int:
        return self.pos.numel()

    def requests(self) -> Iterable[tuple[int, int, int, int]]:
        """(request, first token in the batch, its number of new tokens, its length) of each request
        with tokens in this batch."""
        for r, (a, b) in enumerate(zip(self.starts, self.starts[1:])):
            if b > a:
                yield r, a, b - a, self.seq_lens[r]


@dataclass
class PagedLayer:
    """One layer of vLLM's paged cache as one row per slot: `rows` (blocks · block_size, width) over
    the layer's cache tensor, which only needs blocks first and contiguous (vLLM's CPU backend
    allocates (blocks, kv heads, block_size, 2 · head_dim)); the requests' block table, and this
    batch's slots (vLLM's slot mapping)."""
    rows: torch.Tensor
    block_size: int
    table: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def over(cls, cache: torch.Tensor, block_table: torch.Tensor, slot_mapping: torch.Tensor,
             batch: FlatBatch) -> "PagedLayer":
        blocks, block_size = cache.size(0), cache.size(2)
        return cls(cache.view(blocks * block_size, -1), block_size, block_table.to(torch.long),
                   slot_mapping[: batch.n].to(torch.long))

    def slots_of(self, req: torch.Tensor | int, pos: torch.Tensor) -> torch.Tensor:
        return self.table[req, pos // self.block_size] * self.block_size + pos % self.block_size

    def check(self, batch: FlatBatch) -> None:
        """The block-table addressing reproduces vLLM's slot mapping for every token of the batch."""
        if not torch.equal(self.slots_of(batch.req, batch.pos), self.slots):
            raise PoEError("poegpt's vLLM model cannot locate tokens in the KV cache (the block table "
                           "disagrees with vLLM's slot mapping); this vLLM version is not supported")


class PagedCache(RowLengths):
    """poegpt's cache contract over vLLM's paged cache, for one forward of a flat batch.

    The contract's rows are the batch's requests (`lengths`: the tokens each held before this
    forward); the trunk walks their tokens as one row (1, N) with per-token positions. `layer(kind,
    i)` gives the `PagedLayer` of trunk layer i's keys and values (kind "kv") or of part i of the
    embeddings (kind "embeds": a slot holds 2·G·D numbers, the embedding d, so it takes ⌈d / 2GD⌉
    cache layers). `kernel(i, q, k, v)`, when given, is vLLM's own attention of layer i on (N, ·)
    rows, which stores the keys and values itself. With no batch (vLLM's dummy runs: profiling,
    warm-up) nothing is stored, predecessors come from the batch and attention is zero."""

    def __init__(self, batch: FlatBatch | None, positions: torch.Tensor,
                 layer: Callable[[str, int], PagedLayer] | None = None, kernel: Callable | None = None):
        self.batch, self._positions, self._layer, self.kernel = batch, positions, layer, kernel
        # vLLM keeps the real counts; these move (advance) for the contract's sake only
        self._lengths = [] if batch is None else [L - T for _, _, T, L in batch.requests()]
        self._layers: dict[tuple[str, int], PagedLayer] = {}

    def layer(self, kind: str, i: int) -> PagedLayer:
        """The `PagedLayer` of trunk layer i's keys and values ("kv") or of embedding part i ("embeds")."""
        if (kind, i) not in self._layers:
            self._layers[kind, i] = self._layer(kind, i)
        return self._layers[kind, i]

    def positions(self, T: int, device) -> torch.Tensor:
        if T != self._positions.numel():
            raise PoEError(f"a flat batch of {self._positions.numel()} tokens walks as one, not {T}")
        return self._positions.to(device=device, dtype=torch.long)[None]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos) -> None:
        """Write the batch's keys and values (1, G, N, D) at their slots. Nothing is returned: no one
        view holds a flat batch's keys; `attend` reads them per request."""
        paged, n = self.layer("kv", layer), self.batch.n
        width = k.size(1) * k.size(3)
        paged.rows[paged.slots, :width] = k[0, :, :n].transpose(0, 1).reshape(n, width)
        paged.rows[paged.slots, width:2 * width] = v[0, :, :n].transpose(0, 1).reshape(n, width)

    def store_embeds(self, x: torch.Tensor, pos) -> torch.Tensor:
        """Write the batch's normed embeddings (1, N, d) at their slots; return each token's
        predecessor's (zeros at position 0), read at position p-1 through its request's block table."""
        x = x[0]
        if self.batch is None:
            prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
        else:
            n, d = self.batch.n, x.size(-1)
            before = (self.batch.pos - 1).clamp(min=0)
            prev, lo, j = torch.zeros_like(x), 0, 0
            while lo < d:
                paged = self.layer("embeds", j)
                hi = min(d, lo + paged.rows.size(1))
                paged.rows[paged.slots, : hi - lo] = x[:n, lo:hi]
                prev[:n, lo:hi] = paged.rows[paged.slots_of(self.batch.req, before), : hi - lo]
                lo, j = hi, j + 1
        return (prev * (self._positions > 0).unsqueeze(-1).to(x.dtype))[None]

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos) -> torch.Tensor:
        """Attention of layer `attn` for the flat batch: queries (1, H, N, D), new keys and values
        (1, G, N, D) -> (1, H, N, D). Per request: store, gather its keys from its blocks, and attend
        with the model's own `attn.attend`, called as poegpt's forward calls it over a whole cache."""
        N, H, D = q.size(2), q.size(1), q.size(3)
        if self.kernel is not None:
            rows = [t[0].transpose(0, 1).reshape(N, -1) for t in (q, k, v)]
            return self.kernel(attn.layer, *rows).view(1, N, H, D).transpose(1, 2)
        y = q.new_zeros(1, N, H, D)
        if self.batch is None:
            return y.transpose(1, 2)
        self.store(attn.layer, k, v, pos)
        paged, G = self.layer("kv", attn.layer), k.size(1)
        for r, a, T, L in self.batch.requests():
            kv = paged.rows[paged.slots_of(r, torch.arange(L, device=q.device))]            # (L, 2GD)
            kr = kv[:, : G * D].view(L, G, D).transpose(0, 1)[None]                         # (1, G, L, D)
            vr = kv[:, G * D: 2 * G * D].view(L, G, D).transpose(0, 1)[None]
            y[0, a:a + T] = attn.attend(q[:, :, a:a + T], kr, vr, L - T)[0].transpose(0, 1)
        return y.transpose(1, 2)


# --- what vLLM calls -------------------------------------------------------------------------------------
def boundary_states(model: PoEModel, depth: int, input_ids: torch.Tensor, cache: PagedCache) -> torch.Tensor:
    """The trunk walk over a flat batch (N,) to stage `depth`: the normed boundary states of the stages
    it ran, concatenated (N, depth · d). vLLM keeps the rows it samples from for `logprobs`."""
    pos = cache.positions(input_ids.numel(), input_ids.device)
    _, outs = model.walk(input_ids[None], None, 0, depth, pos, cache)
    return torch.cat(outs, dim=-1)[0]


def logprobs(model: PoEModel, mix: StageMix, hidden: torch.Tensor) -> torch.Tensor:
    """Log-OP log-probs (n, V) of the served mix from rows of `boundary_states`: what vLLM samples from
    as "logits" (softmax of normalised log-probs is the distribution itself)."""
    return mix.logprobs(model, list(hidden.split(model.config.n_embd, dim=-1)))
