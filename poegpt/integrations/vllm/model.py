"""`PoEGPTForCausalLM` as a native vLLM model: a `PoEModel` on vLLM's paged KV cache (docs/vllm.md).

All of the math is poegpt's own (`trunk.py`, which imports no vLLM): the served model is a
`PoEModel` with only the layers its stage mix needs, walked by its own trunk walk against a
`PagedCache`, and `compute_logits` returns the mix's normalised Log-OP log-probs through
`StageMix.logprobs`, so vLLM's greedy, temperature, top-k/top-p, seeds and `logprobs` act on exactly
poegpt's distribution. This module is the hookup to vLLM only:

- the cache storage: one vLLM `Attention` layer per trunk layer (its paged keys and values) and
  ⌈d / 2GD⌉ more for the normed token embeddings the smear gate reads (never run as attention: they
  are there for the cache vLLM allocates, frees, shares under prefix caching and rebuilds after
  preemption like any other layer's). Their names are those of the earlier plugin;
- reading vLLM's forward context (attention metadata, slot mappings) into a `FlatBatch` and one
  `PagedLayer` per cache layer, on the CPU backend's layout (blocks first, contiguous), checking
  once per forward and metadata that the block tables reproduce vLLM's slot mapping;
- vLLM's fused CPU attention kernel with per-layer sliding windows when the config asks for it
  (`poe_attention: "vllm"`); by default attention is the model's own, per request.

Served variants (`--hf-overrides`: `poe_<field>` of a batched mode of the mode table) and what needs
`poegpt serve` instead: docs/vllm.md. Single device only (no tensor or pipeline parallelism).
"""

from __future__ import annotations

from collections.abc import Iterable
import math

import torch
import torch.nn as nn

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention

from ...config import PoEConfig
from ...errors import PoEError
from ...model import norm
from .trunk import (FlatBatch, PagedCache, PagedLayer, attention_kernel, boundary_states, load_weights, logprobs,
                    poe_config, served_mix, served_model)


def _window(cfg: PoEConfig, layer: int) -> int | None:
    """vLLM's sliding window (keys seen, the query included) for poegpt's window w (keys t-w..t)."""
    w = cfg.windows[layer]
    return None if w >= cfg.sequence_len - 1 else w + 1


class PagedStorage(nn.Module):
    """vLLM `Attention` layers that own the paged cache: `kv[i]` for trunk layer i, `embeds[j]` for
    part j of the normed token embeddings. `cache(positions)` is the forward's `PagedCache`."""

    def __init__(self, cfg: PoEConfig, n_layers: int, cache_config, prefix: str, kernel: str):
        super().__init__()
        G, D = cfg.n_kv_head, cfg.head_dim
        self.kernel = kernel
        self.kv = nn.ModuleList(
            Attention(cfg.n_head, D, scale=D ** -0.5, num_kv_heads=G, cache_config=cache_config,
                      per_layer_sliding_window=_window(cfg, i) if kernel == "vllm" else None,
                      prefix=f"{prefix}.blocks.{i}.attn.attn") for i in range(n_layers))
        self.embeds = nn.ModuleList(
            Attention(G, D, scale=1.0, num_kv_heads=G, cache_config=cache_config, prefix=f"{prefix}.smear_state.{j}")
            for j in range(math.ceil(cfg.n_embd / (2 * G * D))))

    def cache(self, positions: torch.Tensor) -> PagedCache:
        kernel = self._kernel if self.kernel == "vllm" else None
        context = self._context()
        if context is None:          # a dummy run (profiling, warm-up): no cache
            return PagedCache(None, positions, kernel=kernel)
        metadata, slot_mappings = context
        some = next(iter(metadata.values()))
        batch = FlatBatch.make(some.query_start_loc, some.seq_lens, positions, int(some.num_actual_tokens))
        checked: set[int] = set()

        def layer(kind: str, i: int) -> PagedLayer:
            attn = (self.kv if kind == "kv" else self.embeds)[i]
            md = metadata[attn.layer_name]
            paged = PagedLayer.over(self._tensor(attn), md.block_table, slot_mappings[attn.layer_name], batch)
            if id(md) not in checked:
                paged.check(batch)
                checked.add(id(md))
            return paged
        return PagedCache(batch, positions, layer, kernel)

    @staticmethod
    def _context() -> tuple[dict, dict] | None:
        """(attention metadata, slot mappings) by layer name, or None in vLLM's dummy runs."""
        if not is_forward_context_available():
            return None
        ctx = get_forward_context()
        md, slots = ctx.attn_metadata, ctx.slot_mapping
        if isinstance(md, list):
            md, slots = md[0], slots[0] if isinstance(slots, list) else slots
        if not isinstance(md, dict) or not md or not isinstance(slots, dict):
            return None
        return md, slots

    @staticmethod
    def _tensor(attn: Attention) -> torch.Tensor:
        """The layer's cache tensor, in the CPU backend's layout (blocks first, contiguous) or refused."""
        cache = attn.kv_cache
        if isinstance(cache, (list, tuple)):
            cache = cache[0]
        backend = attn.attn_backend.get_name()
        if backend != "CPU_ATTN" or cache.dim() != 4 or not cache.is_contiguous():
            raise PoEError(f"poegpt's vLLM model keeps its state in the KV cache layout of vLLM's CPU attention "
                           f"backend; this run uses {backend} with a cache of shape {tuple(cache.shape)}, which "
                           "the plugin does not support yet: use vLLM's CPU build, or poegpt serve")
        return cache

    def _kernel(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.kv[layer](q, k, v)


class PoEGPTForCausalLM(nn.Module):
    """vLLM's entry point for `architectures: ["PoEGPTForCausalLM"]`: `model` is the served `PoEModel`
    (poegpt's parameter names under `model.`, as the exported checkpoint has them)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise PoEError("poegpt's vLLM model runs on one device: leave tensor/pipeline parallelism at 1")
        hf_config = vllm_config.model_config.hf_config
        cfg = poe_config(hf_config)
        self.config = hf_config
        self.mix = served_mix(hf_config, cfg)
        kernel = attention_kernel(hf_config)
        self.model = served_model(cfg, self.mix.depth)
        base = f"{prefix}.model" if prefix else "model"
        self.paged = PagedStorage(cfg, len(self.model.blocks), vllm_config.cache_config, base, kernel)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return norm(self.model.wte(input_ids))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if input_ids is None:
            raise PoEError("poegpt's vLLM model needs token ids (the smear gate and value embeddings read them)")
        return boundary_states(self.model, self.mix.depth, input_ids, self.paged.cache(positions))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return logprobs(self.model, self.mix, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self.model, weights)
