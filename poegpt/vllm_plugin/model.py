"""`PoEGPTForCausalLM` as a native vLLM model: poegpt's trunk on vLLM's paged KV cache, and the
Log-OP of the stage heads as the "logits" vLLM samples from (SPEC §2, §10; docs/vllm.md).

vLLM hands a model one flat batch of tokens (prefill chunks and decode steps of many requests,
`input_ids` (N,), `positions` (N,)) and samples from whatever `compute_logits` returns, treating it
as logits: softmax of it is the distribution. This model returns the normalised Log-OP log-probs
log p_S (already a log-softmax), so softmax(log p_S) = p_S and vLLM's greedy, temperature, top-k,
top-p, seeds and `logprobs` all act on exactly poegpt's distribution.

The trunk computes what `poegpt.model.PoEGPT` computes, with the same parameter names and the same
operations in the same order and dtype (poegpt's own `norm`, `apply_rotary` and attention function):
normed token embedding and **smear gate** (`x + λ·σ(W·x[:24])·x_prev`, x_prev the normed embedding
of the previous token of the same request: `SmearState`); per-layer resid/x0 scalars; value
embeddings gated per KV head; rotary, then QK-norm ×1.2; GQA; the SSSL windows; ReLU² MLP; the
backout on boundaries at or past layer L//2; per stage the head `softcap((W_s + W_k)·norm(h_k))`
with the summed weight formed once, as poegpt caches it. `forward` returns the normed boundary
states of the stages it ran, concatenated ((N, m·d)); vLLM keeps the rows it samples from and passes
them to `compute_logits`.

**Attention** (`CausalSelfAttention`): the keys and values live in vLLM's paged cache. The kernel is
poegpt's own attention, per request (config `poe_attention: "sdpa"`, the default: bf16 results equal
poegpt's bit for bit), or vLLM's fused CPU kernel with per-layer sliding windows (`"vllm"`: exact in
fp32, rounds differently in bf16).

**Which distribution.** Full PoE (every stage, uniform, or entropy-weighted when the config's
`poe_alpha` > 0) by default. A served variant picks another static stage mix through config keys,
given with `--hf-overrides` (or `LLM(hf_overrides=...)`):

    {"poe_max_stages": m}                      prefix PoE of stages 0..m-1
    {"poe_stages": [k]}                        stage k alone
    {"poe_stages": [0, 3], "poe_stage_weights": [0.5, 1.0]}   weighted composition

and the model then *builds* only the layers up to the deepest stage it needs (no weights, no KV
cache, no compute for the rest). WAND and self-speculative decoding decide the depth per token and
need `poegpt serve`.

**Where poegpt's state lives.** A decode step (and the first token of a prefill chunk) has its
predecessor outside the batch. `SmearState` keeps every token's normed embedding in a paged cache of
its own: an extra vLLM `Attention` layer that is never run as attention, only used for the cache
vLLM allocates, frees, shares (prefix caching) and rebuilds (preemption by recompute) like every
other layer's. Each forward writes the batch's embeddings at their slots and reads every token's
predecessor at the slot of position p−1 through the request's block table. The stored value is the
embedding in the model dtype, exactly what poegpt's `KVCache.embeds` holds. The "sdpa" attention
keeps its keys and values the same way. Both rely on the CPU attention backend's cache layout
(blocks first, contiguous); every forward checks that the slot addressing reproduces vLLM's own
slot mapping, and other backends are refused with an error until tested.

Single device only (no tensor or pipeline parallelism).
"""

from __future__ import annotations

from collections.abc import Iterable
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention

from ..config import PoEConfig
from ..engine import StageMix
from ..errors import PoEError
from ..logop import logop
from ..model import apply_rotary, norm, rotary_tables, windowed_attention

WEIGHT_PREFIX = "model."


# --- the stage mix a served model computes -------------------------------------------------------
def served_mix(hf_config, cfg: PoEConfig) -> StageMix:
    """The static stage mix of this served model: full PoE, or the override in the config."""
    K = cfg.n_stages
    max_stages = getattr(hf_config, "poe_max_stages", None)
    stages = getattr(hf_config, "poe_stages", None)
    weights = getattr(hf_config, "poe_stage_weights", None)
    if max_stages is not None and stages is not None:
        raise PoEError("give poe_max_stages (prefix PoE) or poe_stages (composition), not both")
    if weights is not None and stages is None:
        raise PoEError("poe_stage_weights needs poe_stages (the stages they weight)")
    if stages is not None:
        return StageMix.composition(K, list(stages), weights)
    if max_stages is not None and max_stages != K:
        return StageMix.prefix(K, max_stages)
    return StageMix.full(K, cfg.poe_alpha)


def poe_config(hf_config) -> PoEConfig:
    to_poe = getattr(hf_config, "to_poe_config", None)
    if to_poe is None:
        raise PoEError(f"the config of this folder is a {type(hf_config).__name__}, not poegpt's PoEGPTConfig; "
                       "is poegpt's vLLM plugin installed (pip install 'poegpt[vllm]')?")
    return to_poe()


# --- parameters with poegpt's names ----------------------------------------------------------------
def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """nn.Linear without bias or initialisation (the weights are loaded)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = _param(d_out, d_in)

    def forward(self, x):
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = _param(n, d)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


# --- vLLM's paged cache, addressed by this model ---------------------------------------------------
class Batch:
    """The current forward's batch as vLLM scheduled it: per token its request and position, per
    request its query range and length; and, per KV cache group, where a position's slot is.

    `Batch.current(positions)` is None in vLLM's dummy runs (profiling, warm-up), which have no cache."""

    def __init__(self, metadata: dict, slot_mappings: dict, positions: torch.Tensor):
        self.metadata, self.slot_mappings = metadata, slot_mappings
        some = next(iter(metadata.values()))
        self.n = int(some.num_actual_tokens)
        self.num_reqs = some.seq_lens.numel()
        qsl = some.query_start_loc[: self.num_reqs + 1].to(torch.long)
        self.starts = qsl.tolist()
        self.seq_lens = some.seq_lens.tolist()
        self.req = torch.repeat_interleave(torch.arange(self.num_reqs, device=positions.device), qsl.diff(),
                                           output_size=self.n)
        self.pos = positions[: self.n].to(torch.long)
        self._checked: set = set()

    @classmethod
    def current(cls, positions: torch.Tensor) -> "Batch | None":
        if not is_forward_context_available():
            return None
        ctx = get_forward_context()
        md, slots = ctx.attn_metadata, ctx.slot_mapping
        if isinstance(md, list):
            md, slots = md[0], slots[0] if isinstance(slots, list) else slots
        if not isinstance(md, dict) or not md or not isinstance(slots, dict):
            return None
        return cls(md, slots, positions)

    def rows(self, layer: Attention) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """(the layer's cache as one row per token slot, block size, block table, this batch's slots).

        poegpt writes and reads these rows itself, in its own layout, so it relies on the cache
        tensor only being (blocks, heads, block size, 2·head dim) and contiguous, as vLLM's CPU
        backend allocates it; it checks that its addressing reproduces vLLM's slot mapping."""
        name = layer.layer_name
        cache = layer.kv_cache
        if isinstance(cache, (list, tuple)):
            cache = cache[0]
        backend = layer.attn_backend.get_name()
        if backend != "CPU_ATTN" or cache.dim() != 4 or not cache.is_contiguous():
            raise PoEError(f"poegpt's vLLM model keeps its state in the KV cache layout of vLLM's CPU attention "
                           f"backend; this run uses {backend} with a cache of shape {tuple(cache.shape)}, which "
                           "the plugin does not support yet: use vLLM's CPU build, or poegpt serve")
        md = self.metadata[name]
        slots = self.slot_mappings[name][: self.n].to(torch.long)
        table = md.block_table.to(torch.long)
        blocks, heads, block_size, width2 = cache.shape
        if id(md) not in self._checked:
            if not torch.equal(table[self.req, self.pos // block_size] * block_size + self.pos % block_size, slots):
                raise PoEError("poegpt's vLLM model cannot locate tokens in the KV cache (the block table "
                               "disagrees with vLLM's slot mapping); this vLLM version is not supported")
            self._checked.add(id(md))
        return cache.view(blocks * block_size, heads * width2), block_size, table, slots

    @staticmethod
    def slots_of(table: torch.Tensor, req: torch.Tensor | int, pos: torch.Tensor, block_size: int) -> torch.Tensor:
        return table[req, pos // block_size] * block_size + pos % block_size


def _window(cfg: PoEConfig, layer: int) -> int | None:
    """vLLM's sliding window (keys seen, the query included) for poegpt's window w (keys t-w..t)."""
    w = cfg.windows[layer]
    return None if w >= cfg.sequence_len - 1 else w + 1


ATTENTION_KERNELS = ("sdpa", "vllm")


class CausalSelfAttention(nn.Module):
    """poegpt's attention. The keys and values live in vLLM's paged cache (an `Attention` layer);
    the kernel is either

    - "sdpa" (default): poegpt's own attention function (`poegpt.model.windowed_attention`: PyTorch
      SDPA by blocks of queries with poegpt's window masks), called per request over the keys gathered
      from the cache with the arguments poegpt's forward passes, so bf16 results match poegpt's bit
      for bit rather than to bf16 rounding; the layer's cache then keeps every key (no sliding-window
      block freeing) and the plugin writes it itself;
    - "vllm": vLLM's fused CPU paged-attention kernel with per-layer sliding windows, which rounds
      differently from PyTorch's in bf16 (docs/vllm.md has the measured difference).
    """

    def __init__(self, cfg: PoEConfig, layer: int, cache_config, prefix: str, kernel: str):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window, self.kernel = cfg.windows[layer], kernel
        d, hd = cfg.n_embd, cfg.head_dim
        self.c_q = Linear(d, cfg.n_head * hd)
        self.c_k = Linear(d, cfg.n_kv_head * hd)
        self.c_v = Linear(d, cfg.n_kv_head * hd)
        self.c_proj = Linear(cfg.n_head * hd, d)
        self.ve_gate = Linear(12, cfg.n_kv_head) if cfg.has_value_embed(layer) else None
        self.attn = Attention(cfg.n_head, hd, scale=hd ** -0.5, num_kv_heads=cfg.n_kv_head, cache_config=cache_config,
                              per_layer_sliding_window=_window(cfg, layer) if kernel == "vllm" else None,
                              prefix=f"{prefix}.attn")

    def forward(self, x, ve, cos, sin, batch: Batch | None):
        N = x.size(0)
        q = self.c_q(x).view(N, self.n_head, self.head_dim)
        k = self.c_k(x).view(N, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(N, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))            # (N, G)
            v = v + gate.unsqueeze(-1) * ve.view(N, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * 1.2, norm(k) * 1.2
        if self.kernel == "vllm":
            y = self.attn(q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1))
        else:
            y = self.sdpa(q, k, v, batch)
        return self.c_proj(y)

    def sdpa(self, q, k, v, batch: Batch | None) -> torch.Tensor:
        """Per request: store its new keys/values, gather all of them, attend as poegpt does."""
        N, G, D = k.shape
        y = torch.zeros(N, self.n_head, D, dtype=q.dtype, device=q.device)
        if batch is None:       # dummy run: nothing cached, nothing to attend to
            return y.view(N, -1)
        rows, bs, table, slots = batch.rows(self.attn)
        n = batch.n
        rows[slots, : G * D] = k[:n].reshape(n, -1)
        rows[slots, G * D: 2 * G * D] = v[:n].reshape(n, -1)
        for r in range(batch.num_reqs):
            a, b = batch.starts[r], batch.starts[r + 1]
            if a == b:
                continue
            L, T = batch.seq_lens[r], b - a
            kv = rows[Batch.slots_of(table, r, torch.arange(L, device=q.device), bs)]     # (L, 2GD)
            kr = kv[:, : G * D].view(L, G, D).transpose(0, 1)[None]                        # (1, G, L, D)
            vr = kv[:, G * D: 2 * G * D].view(L, G, D).transpose(0, 1)[None]
            qr = q[a:b].transpose(0, 1)[None]                                              # (1, H, T, D)
            # poegpt's own attention over a whole cache, called as poegpt calls it: the same bits
            out = windowed_attention(qr, kr, vr, L - T, self.window, self.n_head != G)
            y[a:b] = out[0].transpose(0, 1)
        return y.view(N, -1)


class MLP(nn.Module):
    def __init__(self, cfg: PoEConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: PoEConfig, layer: int, cache_config, prefix: str, kernel: str):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer, cache_config, f"{prefix}.attn", kernel)
        self.mlp = MLP(cfg)

    def forward(self, x, ve, cos, sin, batch):
        x = x + self.attn(norm(x), ve, cos, sin, batch)
        return x + self.mlp(norm(x))


# --- the smear gate's state -------------------------------------------------------------------------
class SmearState(nn.Module):
    """Every token's normed embedding, kept in vLLM's paged cache of extra `Attention` layers (never
    run as attention), so that a token can read its predecessor's wherever that token was computed.

    A slot of the cache holds 2·G·D numbers (keys and values of G heads of D); the embedding (d
    numbers) takes ceil(d / (2·G·D)) such layers, one for the demo and the card's shapes."""

    def __init__(self, cfg: PoEConfig, cache_config, prefix: str):
        super().__init__()
        self.d = cfg.n_embd
        self.width = 2 * cfg.n_kv_head * cfg.head_dim
        self.layers = nn.ModuleList(
            Attention(cfg.n_kv_head, cfg.head_dim, scale=1.0, num_kv_heads=cfg.n_kv_head, cache_config=cache_config,
                      prefix=f"{prefix}.{j}") for j in range(math.ceil(self.d / self.width)))

    def previous(self, x: torch.Tensor, positions: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        """Store x (N, d), the normed embeddings of the batch, and return each token's predecessor's
        (zeros at position 0)."""
        if batch is None:   # dummy run: predecessors within the batch only
            prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
            return prev * (positions > 0).unsqueeze(-1).to(x.dtype)
        n = batch.n
        before = (batch.pos - 1).clamp(min=0)
        prev = torch.zeros_like(x)
        for j, layer in enumerate(self.layers):
            rows, bs, table, slots = batch.rows(layer)
            lo, hi = j * self.width, min(self.d, (j + 1) * self.width)
            rows[slots, : hi - lo] = x[:n, lo:hi]
            prev[:n, lo:hi] = rows[Batch.slots_of(table, batch.req, before, bs), : hi - lo]
        return prev * (positions > 0).unsqueeze(-1).to(x.dtype)


# --- the model --------------------------------------------------------------------------------------
class PoEGPTModel(nn.Module):
    """The trunk up to the deepest stage served, with poegpt's parameter names."""

    def __init__(self, cfg: PoEConfig, mix: StageMix, cache_config, prefix: str, kernel: str = "sdpa"):
        super().__init__()
        self.config, self.mix = cfg, mix
        self.depth = mix.depth                              # stages run
        self.n_layers = cfg.boundaries[self.depth - 1] + 1  # layers built
        V, d = cfg.padded_vocab_size, cfg.n_embd
        self.wte = Embedding(V, d)
        self.blocks = nn.ModuleList(Block(cfg, i, cache_config, f"{prefix}.blocks.{i}", kernel) for i in range(self.n_layers))
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, cfg.n_kv_head * cfg.head_dim)
                                           for i in range(self.n_layers) if cfg.has_value_embed(i)})
        self.lm_head = Linear(d, V)
        self.lm_head_stages = nn.ModuleList(Linear(d, V) for _ in range(self.depth))
        self.resid_lambdas = _param(cfg.n_layer)
        self.x0_lambdas = _param(cfg.n_layer)
        self.smear_gate = Linear(24, 1)
        self.smear_lambda = _param(1)
        self.backout_lambda = _param(1)
        self.smear = SmearState(cfg, cache_config, f"{prefix}.smear_state")
        cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos[0, :, 0].to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("rope_sin", sin[0, :, 0].to(torch.get_default_dtype()), persistent=False)
        self.summed_heads: list[torch.Tensor] = []

    def wanted(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs to the part of the trunk this model builds."""
        parts = name.split(".")
        if parts[0] in ("blocks", "value_embeds"):
            return int(parts[1]) < self.n_layers
        if parts[0] == "lm_head_stages":
            return int(parts[1]) < self.depth
        return True

    def sum_heads(self) -> None:
        """W_s + W_k per stage, in the weights' dtype, as `PoEGPT.head_weight` forms it."""
        self.summed_heads = [self.lm_head.weight + head.weight for head in self.lm_head_stages]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        batch = Batch.current(positions)
        x = norm(self.wte(input_ids))
        prev = self.smear.previous(x, positions, batch)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24]))
        x = x + gate * prev
        x0, x_mid = x, None
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (N, 1, D/2)
        outs = []
        boundaries = cfg.boundaries[: self.depth]
        for i in range(self.n_layers):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = self.blocks[i](x, ve, cos, sin, batch)
            if i == cfg.backout_layer:
                x_mid = x
            if i in boundaries:
                h = x - self.backout_lambda * x_mid if i >= cfg.backout_layer else x
                outs.append(norm(h))
        return torch.cat(outs, dim=-1)

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-OP log-probs (n, V) of the served stages from the concatenated boundary states."""
        cfg = self.config
        if not self.summed_heads:
            self.sum_heads()
        hs = hidden.split(cfg.n_embd, dim=-1)
        logps = []
        for k in self.mix.stages:
            z = F.linear(hs[k], self.summed_heads[k].to(hs[k].dtype))[..., : cfg.vocab_size]
            z = z.to(torch.promote_types(z.dtype, torch.float32))
            logps.append(F.log_softmax(cfg.softcap * torch.tanh(z / cfg.softcap), -1))
        return logop(logps, self.mix.weights, self.mix.alpha if self.mix.weights is None else 0.0)


class PoEGPTForCausalLM(nn.Module):
    """vLLM's entry point for `architectures: ["PoEGPTForCausalLM"]` (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if vllm_config.parallel_config.tensor_parallel_size > 1 or vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise PoEError("poegpt's vLLM model runs on one device: leave tensor/pipeline parallelism at 1")
        hf_config = vllm_config.model_config.hf_config
        cfg = poe_config(hf_config)
        self.config = hf_config
        self.mix = served_mix(hf_config, cfg)
        kernel = getattr(hf_config, "poe_attention", None) or "sdpa"
        if kernel not in ATTENTION_KERNELS:
            raise PoEError(f"poe_attention must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
        base = f"{prefix}.model" if prefix else "model"
        self.model = PoEGPTModel(cfg, self.mix, vllm_config.cache_config, base, kernel)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return norm(self.model.wte(input_ids))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if input_ids is None:
            raise PoEError("poegpt's vLLM model needs token ids (the smear gate and value embeddings read them)")
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.logprobs(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if not name.startswith(WEIGHT_PREFIX):
                raise PoEError(f"unexpected tensor {name!r} in the checkpoint; was the folder written by poegpt export-hf?")
            if not self.model.wanted(name[len(WEIGHT_PREFIX):]):
                continue            # a layer or head beyond the stages this model serves
            param = params.get(name)
            if param is None or param.shape != tensor.shape:
                raise PoEError(f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit this model "
                               f"({None if param is None else tuple(param.shape)}); the folder does not match its config")
            param.data.copy_(tensor)
            loaded.add(name)
        self.model.sum_heads()
        return loaded
