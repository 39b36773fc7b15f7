"""PoEModel: nanochat's GPT trunk cut into Product-of-Experts stages — the network only (docs/design.md §3).

The trunk (feature for feature nanochat's GPT): normed token embedding with a smear gate, per-layer
resid/x0 scalars, parameter-free RMSNorm, rotary (base 100k), QK-norm (then ×1.2), GQA, sliding
windows by pattern (SSSL, last layer long), value embeddings on alternating layers, ReLU² MLP,
a mid-network backout, soft-capped logits, no biases.

PoE: the layers are split into stages; stage k ends at boundary layer b_k and predicts the next
token with z_k = softcap((W_s + W_k) · norm(h_k)), one matmul with the summed weight of the shared
head W_s (`lm_head`) and its additive stage head W_k (`lm_head_stages[k]`). Backout applies to a
boundary at or past layer L//2 (h_k − λ·x_mid); a boundary before it reads h_k as is.

With `stage_grad="isolated"` the residual stream entering each stage (and x_mid) is detached, so a
stage's loss trains only its own layers and heads plus the parameters every stage uses (embedding,
value embeddings of its layers, shared head, scalars).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache, Positions
from .config import Calibration, PoEConfig
from .errors import PoEError
from .logop import logop, logop_logits


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin: (1, T, 1, D/2). Rotate the two halves of the head dim.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


@functools.lru_cache(maxsize=16)   # the short-window layers of one forward share their mask
def attention_mask(q_pos0: int, n_q: int, n_k: int, window: int, device) -> torch.Tensor | None:
    """Boolean (n_q, n_k) mask, True = attend: causal and within `window` of the query.
    Queries sit at absolute positions q_pos0 .. q_pos0+n_q-1, keys at 0 .. n_k-1.
    None when no mask is needed: plain causal attention with aligned ends (no cache offset), or a
    single query that sees every key (the common decode step)."""
    if (q_pos0 == 0 and n_q == n_k and window >= n_q - 1) or (n_q == 1 and n_k == q_pos0 + 1 and window >= q_pos0):
        return None
    return window_mask(torch.arange(q_pos0, q_pos0 + n_q, device=device), n_k, window)


WINDOW_BLOCK = 128   # the smallest query block of windowed_attention


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, window: int,
                       gqa: bool = False) -> torch.Tensor:
    """Causal sliding-window attention of T queries at positions pos..pos+T-1 over keys 0..pos+T-1:
    q (B, H, T, D), k/v (B, G, pos+T, D) -> (B, H, T, D).

    Queries go in blocks of `window` (at least WINDOW_BLOCK); each block reads only the keys its
    window can reach (keys before pos+s-window are skipped, not masked), so the cost is O(T·window)
    rather than O(T²) and the mask is at most (block, block + window). A block that sees every key
    from the start uses SDPA's is_causal (no mask at all); interior blocks share one cached mask.
    A single query sees the last window+1 keys and needs no mask."""
    T = q.size(2)
    block = max(window, WINDOW_BLOCK)
    ys = []
    for s in range(0, T, block):
        e = min(T, s + block)
        lo = max(0, pos + s - window)                   # the first key any query of the block can see
        mask = attention_mask(pos + s - lo, e - s, pos + e - lo, window, q.device)
        ys.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:pos + e], v[:, :, lo:pos + e],
                                                 attn_mask=mask, is_causal=mask is None and e - s > 1,
                                                 enable_gqa=gqa))
    return ys[0] if len(ys) == 1 else torch.cat(ys, 2)


def window_mask(q_pos: torch.Tensor, n_k: int, window: int) -> torch.Tensor:
    """(..., n_q, n_k) mask for queries at absolute positions q_pos (..., n_q) over keys 0 .. n_k-1."""
    q = q_pos[..., None]
    k = torch.arange(n_k, device=q_pos.device)
    return (k <= q) & (q - k <= window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.windows[layer]
        d, hd = config.n_embd, config.head_dim
        self.c_q = nn.Linear(d, config.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(config.n_head * hd, d, bias=False)
        self.ve_gate = nn.Linear(12, config.n_kv_head, bias=False) if config.has_value_embed(layer) else None

    def forward(self, x, ve, cos, sin, pos: Positions, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.project(x, ve, cos, sin)
        # a cache form that attends by itself takes over here (vLLM's paged cache: per request, over its blocks)
        attend = getattr(cache, "attend", None)
        y = attend(self, q, k, v, pos) if attend is not None else self.attend(q, k, v, pos, cache)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def project(self, x, ve, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D) and keys, values (B, G, T, D) of the normed stream x (B, T, d): the
        projections, the gated value embedding, rotary, then QK-norm."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, gated per KV head by the first 12 channels
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))            # (B, T, G)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * 1.2, norm(k) * 1.2
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q, k, v, pos: Positions, cache: KVCache | None = None) -> torch.Tensor:
        """Store the new keys/values in the cache (if any), then causal windowed attention of the
        queries (B, H, T, D) at positions pos over the keys in view: (B, H, T, D). With a `stepwise`
        cache, query by query over the keys its one-token step would have in view: SDPA's sums round
        differently over a different number of keys (bf16: 4e-3 on one layer's output), and a
        speculative verify pass must compute each position as the plain steps it stands for."""
        T = q.size(2)
        if cache is not None:
            k, v = cache.store(self.layer, k, v, pos)
        if T > 1 and getattr(cache, "stepwise", False):
            steps = []
            for i in range(T):
                p = pos + i if isinstance(pos, int) else pos[:, i:i + 1]
                n = cache.in_view(p, 1)
                steps.append(self.over_keys(q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n], p))
            return torch.cat(steps, 2)
        return self.over_keys(q, k, v, pos)

    def over_keys(self, q, k, v, pos: Positions) -> torch.Tensor:
        """Causal windowed attention of the queries (B, H, T, D) at positions pos over keys/values
        (B, G, n_k, D), the first n_k positions: (B, H, T, D)."""
        T = q.size(2)
        gqa = self.n_head != self.n_kv_head
        if isinstance(pos, int) and k.size(2) == pos + T:
            return windowed_attention(q, k, v, pos, self.window, gqa)
        mask = window_mask(pos, k.size(2), self.window)
        mask = mask.unsqueeze(1) if mask.dim() == 3 else mask                 # (B, 1, T, n_k) per row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config: PoEConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: PoEConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, pos, cache):
        x = x + self.attn(norm(x), ve, cos, sin, pos, cache)
        return x + self.mlp(norm(x))


@dataclass
class TrunkState:
    """The residual stream while walking the layers: x (B, T, d), the embedding x0 it mixes back
    in, and x_mid, the stream after layer L//2 that the backout subtracts (None before it)."""
    x: torch.Tensor
    x0: torch.Tensor
    x_mid: torch.Tensor | None = None

    def detached(self) -> "TrunkState":
        return TrunkState(self.x.detach(), self.x0, None if self.x_mid is None else self.x_mid.detach())

    def positions(self, start: int, stop: int) -> "TrunkState":
        """The stream at token positions start..stop-1 (dim 1)."""
        return TrunkState(self.x[:, start:stop], self.x0[:, start:stop],
                          None if self.x_mid is None else self.x_mid[:, start:stop])

    @staticmethod
    def cat(states: list["TrunkState"]) -> "TrunkState":
        """States of consecutive token positions as one (along dim 1)."""
        mids = [s.x_mid for s in states]
        return TrunkState(torch.cat([s.x for s in states], 1), torch.cat([s.x0 for s in states], 1),
                          None if mids[0] is None else torch.cat(mids, 1))


class PoEModel(nn.Module):
    """The network: modules, the trunk walk, stage heads, initialisation and cost accounting.
    Generation lives in the layers above (`api.PoEGPT` adds the model card's methods)."""

    def __init__(self, config: PoEConfig):
        super().__init__()
        self.config = config
        V, d = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        self.lm_head = nn.Linear(d, V, bias=False)                                     # shared head W_s
        self.lm_head_stages = nn.ModuleList(nn.Linear(d, V, bias=False) for _ in range(config.n_stages))
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = nn.Linear(24, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self._summed_heads: dict[int, tuple] = {}
        self.calibration = Calibration()     # WAND bounds, auto-draft thresholds: set when a checkpoint loads
        self.checkpoint_meta: dict = {}       # the checkpoint's meta.json, when loaded from one
        cos, sin = rotary_tables(config.sequence_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.wte.weight.device.type != "meta":
            self.init_weights()

    # --- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """All initialisation in one place (nanochat's scheme; stage heads start at zero, so every
        stage starts as the shared head)."""
        if seed is not None:
            torch.manual_seed(seed)
        cfg = self.config
        s = 3 ** 0.5 * cfg.n_embd ** -0.5
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for head in self.lm_head_stages:
            nn.init.zeros_(head.weight)
        for block in self.blocks:
            a = block.attn
            for lin in (a.c_q, a.c_k, a.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(a.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if a.ve_gate is not None:
                nn.init.uniform_(a.ve_gate.weight, 0.0, 0.02)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        L = cfg.n_layer
        frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base, device=self.wte.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    # --- trunk -----------------------------------------------------------------------------------
    def embed(self, idx: torch.Tensor, cache: KVCache | None = None, pos: Positions = 0) -> torch.Tensor:
        """Normed token embedding plus the smear of the previous token's: (B, T) -> (B, T, d).
        With a cache, the embeddings are stored at `pos` and the previous position's is read back."""
        x = norm(self.wte(idx))
        if cache is None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))                   # position 0 has no predecessor
        else:
            prev = cache.store_embeds(x, pos)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24]))
        return x + gate * prev

    def rotary(self, pos: Positions, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for T tokens at pos: (1, T, 1, D/2), or (B, T, 1, D/2) for per-row positions."""
        if isinstance(pos, int):
            end = pos + T
        else:   # a compiled step checks its positions before it runs (a host sync here would break the graph)
            end = 0 if torch.compiler.is_compiling() else int(pos.max()) + 1
        if end > self.config.sequence_len:
            raise PoEError(f"sequence of {end} tokens exceeds the model's context of {self.config.sequence_len}")
        if isinstance(pos, int):
            return self.rope_cos[:, pos:pos + T], self.rope_sin[:, pos:pos + T]
        return self.rope_cos[0, :, 0][pos].unsqueeze(2), self.rope_sin[0, :, 0][pos].unsqueeze(2)

    def boundary_output(self, state: TrunkState, layer: int) -> torch.Tensor:
        """norm(h) for a stage ending at `layer`, with the backout past the middle of the trunk."""
        x = state.x
        if layer >= self.config.backout_layer:
            x = x - self.backout_lambda * state.x_mid
        return norm(x)

    def walk(self, idx: torch.Tensor, state: TrunkState | None = None, first: int = 0, last: int | None = None,
             pos: Positions = 0, cache: KVCache | None = None, isolate: bool = False
             ) -> tuple[TrunkState, list[torch.Tensor]]:
        """The trunk walk, the one place the layers run: stages first..last-1 (layers
        b_{first-1}+1 .. b_{last-1}) for the rows of `idx` (B, T) at positions `pos`, against `cache`.
        With no `state` the walk starts from the embedding (first = 0). Returns the stream after the
        last stage and each walked stage's normed boundary output [(B, T, d)]. The cache's lengths are
        the caller's to advance. `isolate` detaches the stream (and x_mid) entering each stage k > 0."""
        cfg = self.config
        last = cfg.n_stages if last is None else last
        if state is None:
            if first != 0:
                raise PoEError(f"a trunk walk from the embedding starts at stage 0, not {first}")
            x = self.embed(idx, cache, pos)
            state = TrunkState(x, x)
        b, outs = cfg.boundaries, []
        for k in range(first, last):
            if isolate and k > 0:
                state = state.detached()
            state = self.run_layers(state, idx, b[k - 1] + 1 if k else 0, b[k] + 1, pos, cache)
            outs.append(self.boundary_output(state, b[k]))
        return state, outs

    def run_layers(self, state: TrunkState, idx: torch.Tensor, start: int, stop: int, pos: Positions = 0,
                   cache: KVCache | None = None) -> TrunkState:
        """Layers start..stop-1 on the stream of tokens `idx` at positions pos (the walk's inner loop)."""
        cos, sin = self.rotary(pos, idx.size(1))
        x, x_mid = state.x, state.x_mid
        for i in range(start, stop):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * state.x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = self.blocks[i](x, ve, cos, sin, pos, cache)
            if i == self.config.backout_layer:
                x_mid = x
        return TrunkState(x, state.x0, x_mid)

    def trunk(self, idx: torch.Tensor, n_stages: int | None = None, cache: KVCache | None = None,
              isolate: bool = False) -> list[torch.Tensor]:
        """Normed boundary states [norm(h_0), ..., norm(h_{m-1})] of the first m stages for new tokens
        `idx`, running only the layers they need; with a cache the tokens go at its lengths, which
        advance. (`walk` from the embedding, plus the cache's bookkeeping.)"""
        pos = cache.positions(idx.size(1), idx.device) if cache is not None else 0
        _, outs = self.walk(idx, None, 0, n_stages, pos, cache, isolate)
        if cache is not None:
            cache.advance(idx.size(1))
        return outs

    # --- heads -----------------------------------------------------------------------------------
    def head_weight(self, stage: int) -> torch.Tensor:
        """W_s + W_k: one (V_padded, d) matrix per stage. Outside autograd the sum is kept and reused
        until either weight changes (their version counters say when), so decoding adds nothing per token."""
        ws, wk = self.lm_head.weight, self.lm_head_stages[stage].weight
        if torch.is_grad_enabled():
            return ws + wk
        key = (ws._version, wk._version, ws.data_ptr(), wk.data_ptr(), ws.dtype, ws.device)
        cached = self._summed_heads.get(stage)
        if cached is None or cached[0] != key:
            cached = (key, ws + wk)
            self._summed_heads[stage] = cached
        return cached[1]

    def stage_logits(self, h: torch.Tensor, stage: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Soft-capped fp32 logits (..., V) of stage `stage` from its normed boundary state."""
        w = self.head_weight(stage) if weight is None else weight
        z = F.linear(h, w.to(h.dtype))[..., : self.config.vocab_size]
        z = z.to(torch.promote_types(z.dtype, torch.float32))      # fp32 at least (fp64 stays fp64)
        c = self.config.softcap
        return c * torch.tanh(z / c)

    def shared_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared head alone on a boundary state: W_s · norm(h) (soft-capped)."""
        return self.stage_logits(h, 0, weight=self.lm_head.weight)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, **loss_options) -> torch.Tensor:
        """Full-PoE normalised log-probs (B, T, V): Log-OP of every stage, poe_alpha applied."""
        if targets is not None:
            raise PoEError("the model computes log-probs only; the training loss is "
                           "poegpt.objectives.PoELoss(model)(idx, targets)")
        cfg = self.config
        logits = [self.stage_logits(h, k) for k, h in enumerate(self.trunk(idx))]
        if cfg.poe_alpha > 0:
            return logop([F.log_softmax(z, -1) for z in logits], alpha=cfg.poe_alpha)
        return logop_logits(logits)

    @torch.no_grad()
    def stage_logprobs(self, idx: torch.Tensor, n_stages: int | None = None) -> list[torch.Tensor]:
        """Per-stage log-probs [(B, T, V)] of the first n stages (all by default)."""
        return [F.log_softmax(self.stage_logits(h, k), -1) for k, h in enumerate(self.trunk(idx, n_stages))]

    @torch.no_grad()
    def forward_stage(self, ids: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits (B, T, V) of one stage, evaluating the trunk only up to its boundary."""
        self._check_stage(stage)
        return self.stage_logits(self.trunk(ids, stage + 1)[stage], stage)

    def _check_stage(self, stage) -> None:
        K = self.config.n_stages
        if not isinstance(stage, int) or not 0 <= stage < K:
            raise PoEError(f"stage must be an integer in 0..{K - 1}, got {stage!r}")

    # --- accounting ------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def params_by_component(self) -> dict[str, int]:
        blocks = self.blocks
        ve_gates = sum(b.attn.ve_gate.weight.numel() for b in blocks if b.attn.ve_gate is not None)
        counts = {
            "wte": self.wte.weight.numel(),
            "lm_head (shared)": self.lm_head.weight.numel(),
            "lm_head_stages": sum(h.weight.numel() for h in self.lm_head_stages),
            "blocks": sum(p.numel() for p in blocks.parameters()) - ve_gates,
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "ve_gates": ve_gates,
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                                self.smear_lambda, self.backout_lambda)),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == self.num_params()
        return counts

    def _layer_matmul_params(self, i: int) -> int:
        return sum(m.weight.numel() for m in self.blocks[i].modules() if isinstance(m, nn.Linear))

    def _attention_flops(self, layer: int, keys: float) -> float:
        """Forward FLOPs of QK^T and AV for one query over `keys` keys."""
        return 4 * self.config.n_head * self.config.head_dim * keys

    def flops_per_token(self, n_stages: int | None = None, context: int | None = None, training: bool = False,
                        heads: int | None = None) -> int:
        """Matmul FLOPs per token through the first n stages (all by default) with their heads.
        Forward = 2·(matmul params) + attention; training = 3× forward, attention averaged over the
        positions of a `context`-long sequence; decoding = one query with `context` tokens in view.
        `heads` overrides the number of stage heads evaluated (final_only trains one)."""
        cfg = self.config
        m = cfg.n_stages if n_stages is None else n_stages
        T = cfg.sequence_len if context is None else context
        n_layers = cfg.boundaries[m - 1] + 1
        head_params = (m if heads is None else heads) * cfg.padded_vocab_size * cfg.n_embd
        params = sum(self._layer_matmul_params(i) for i in range(n_layers)) + head_params + self.smear_gate.weight.numel()
        attn = 0.0
        for i in range(n_layers):
            n = min(T, cfg.windows[i] + 1)  # keys a query can see
            keys = (n * (n + 1) / 2 + (T - n) * n) / T if training else n
            attn += self._attention_flops(i, keys)
        forward = 2 * params + attn
        return int(3 * forward if training else forward)

    def train_flops_per_token(self) -> int:
        heads = 1 if self.config.objective == "final_only" else self.config.n_stages
        return self.flops_per_token(training=True, heads=heads)

    def decode_weight_bytes(self, n_stages: int | None = None, dtype=torch.bfloat16) -> int:
        """Weight bytes a batch-1 decode step reads through the first n stages (matmul weights incl. the
        summed stage heads; embedding rows are gathered, not read whole): the roofline's numerator."""
        return self.flops_per_token(n_stages, context=0) // 2 * torch.finfo(dtype).bits // 8

    def kv_bytes_per_token(self, dtype=torch.bfloat16, n_stages: int | None = None) -> int:
        cfg = self.config
        m = cfg.n_stages if n_stages is None else n_stages
        n_layers = cfg.boundaries[m - 1] + 1
        return n_layers * 2 * cfg.n_kv_head * cfg.head_dim * torch.finfo(dtype).bits // 8
