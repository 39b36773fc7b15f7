"""vLLM's paged KV cache faked on plain tensors, as vLLM's CPU backend lays it out: per cache layer a
(blocks, kv heads, block_size, 2 · head_dim) tensor, blocks handed out from a shuffled free list, a
block table per request, a slot mapping per token; unwritten slots hold NaN. Each forward comes as
vLLM builds its attention metadata, over which `PagedCache` (poegpt/integrations/vllm/trunk.py) is
the cache contract. Used by tests/test_vllm_math.py (mixed flat batches against each request alone)
and tests/test_cache.py (the cache contract's conformance test).
"""

import math
import random

import torch

from poegpt.integrations.vllm.trunk import FlatBatch, PagedCache, PagedLayer

BLOCK = 16


class FakePagedCache:
    """vLLM's paged KV cache as its CPU backend lays it out, for `n_kv` trunk layers and the cache
    layers of the embeddings; blocks are handed out from a shuffled free list as requests grow."""

    def __init__(self, cfg, n_kv: int, num_blocks: int = 64, seed: int = 0, dtype=torch.float32):
        G, D = cfg.n_kv_head, cfg.head_dim
        n_embeds = math.ceil(cfg.n_embd / (2 * G * D))
        shape = (num_blocks, G, BLOCK, 2 * D)
        self.tensors = {**{("kv", i): torch.full(shape, math.nan, dtype=dtype) for i in range(n_kv)},
                        **{("embeds", j): torch.full(shape, math.nan, dtype=dtype) for j in range(n_embeds)}}
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}

    def forward(self, step, tokens, pad: int = 0):
        """(input ids, positions, PagedCache) of one forward over `step` [(request, first position, number
        of tokens)] in batch order, request r's token ids being tokens[r], then `pad` padding tokens, as
        vLLM builds its metadata: query start locations, sequence lengths, block table rows in batch
        order, slot mapping (-1 for padding)."""
        ids, pos, starts, seq_lens, slots = [], [], [0], [], []
        for r, start, n in step:
            blocks = self.blocks.setdefault(r, [])
            while len(blocks) * BLOCK < start + n:
                blocks.append(self.free.pop())
            ids += tokens[r][start:start + n]
            pos += list(range(start, start + n))
            slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
        width = max(len(self.blocks[r]) for r, _, _ in step)
        table = torch.tensor([self.blocks[r] + [0] * (width - len(self.blocks[r])) for r, _, _ in step],
                             dtype=torch.int32)
        positions = torch.tensor(pos + [0] * pad)
        batch = FlatBatch.make(torch.tensor(starts, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                               positions, len(pos))
        slot_mapping = torch.tensor(slots + [-1] * pad)

        def layer(kind: str, i: int) -> PagedLayer:
            paged = PagedLayer.over(self.tensors[(kind, i)], table, slot_mapping, batch)
            paged.check(batch)
            return paged
        return torch.tensor(ids + [0] * pad), positions, PagedCache(batch, positions, layer)
