"""The KV cache: the one contract every cache form of poegpt meets (docs/design.md, "Cache contract").

A cache holds, per layer, the keys and values of every position seen so far, plus every position's
normed token embedding, which the smear gate of the next position reads. Rows may hold different
numbers of tokens: `lengths[b]` is row b's, and only the cache changes it (`reset`, `advance`,
`rollback`), so a reader never sees a half-updated count.

What the trunk walk calls (and what the other cache forms implement: the Hugging Face wrapper's
view over a transformers cache, `integrations/hf`; vLLM's paged cache, `integrations/vllm`):

    positions(T, device)        where T new tokens per row go: an int when every row is aligned,
                                else a (B, T) tensor of absolute positions
    store(layer, k, v, pos)     write (B, G, T, D) keys/values at pos; return the keys/values in view
    store_embeds(x, pos)        write (B, T, d) embeddings at pos; return each token's predecessor's
                                embedding (zeros at position 0)
    lengths / advance(n)        tokens held per row (read-only tuple) / add n (an int, or one per row)

and what the engines use on top: `reset(lengths)`, `rollback(row, length)` (speculative decoding's
rejected drafts), `rows(start, stop)` (a view of some rows sharing storage: the server's batch),
`move_row(src, dst, n)` (compacting the server's batch), `full_view` (the compiled steps' fixed
shapes: writes at device positions without a host-side room check, attention over every slot
under a position mask), and `stepwise` (T new tokens attend query by query over the keys each
would see as a one-token step: a speculative verify pass without a full view, so that its tokens
are bitwise those of plain steps; with a full view the key count is fixed and it is not needed).
"""

from __future__ import annotations

import torch

from .config import PoEConfig
from .errors import PoEError

Positions = "int | torch.Tensor"  # one start position for every row, or (B, T) absolute positions


class RowLengths:
    """The contract's per-row token counts: `lengths` (read-only) and `advance`, over `_lengths`.
    Every cache form derives from it, so no form writes its counts another way."""
    _lengths: list[int]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    def advance(self, n) -> None:
        """Row b now holds n (an int) or n[b] more tokens."""
        ns = [n] * len(self._lengths) if isinstance(n, int) else list(n)
        self._lengths = [a + b for a, b in zip(self._lengths, ns)]


class KVCache(RowLengths):
    """Preallocated keys/values per layer (gpt-fast style): k[i], v[i] of shape (B, G, max_len, D),
    plus every position's normed token embedding (B, max_len, d)."""

    full_view = False
    stepwise = False

    def __init__(self, config: PoEConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > config.sequence_len:
            raise PoEError(f"the KV cache cannot exceed the context of {config.sequence_len} tokens (asked {max_len})")
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.embeds = torch.zeros(batch_size, max_len, config.n_embd, dtype=dtype, device=device)
        self.max_len = max_len
        self._lengths = [0] * batch_size

    @classmethod
    def _view(cls, k, v, embeds, max_len: int, full_view: bool, lengths: list[int]) -> "KVCache":
        view = cls.__new__(cls)
        view.k, view.v, view.embeds = k, v, embeds
        view.max_len, view.full_view, view._lengths = max_len, full_view, lengths
        return view

    # --- lengths: written here only ----------------------------------------------------------------
    def reset(self, lengths: list[int] | None = None) -> None:
        """Every row holds `lengths[b]` tokens (none when None): a new generation in a reused cache."""
        lengths = [0] * len(self._lengths) if lengths is None else [int(n) for n in lengths]
        if len(lengths) != len(self._lengths) or any(not 0 <= n <= self.max_len for n in lengths):
            raise PoEError(f"cache lengths must be {len(self._lengths)} counts in 0..{self.max_len}, got {lengths}")
        self._lengths = lengths

    def rollback(self, row: int, length: int) -> None:
        """Row `row` keeps its first `length` tokens; later entries sit past the end, unread, until
        overwritten (speculative decoding's rejected drafts)."""
        if not 0 <= length <= self._lengths[row]:
            raise PoEError(f"cannot roll row {row} back to {length} tokens: it holds {self._lengths[row]}")
        self._lengths[row] = length

    # --- where tokens go ---------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        if any(n != self._lengths[0] for n in self._lengths):
            raise PoEError("rows of this cache hold different lengths; use cache.lengths")
        return self._lengths[0]

    def positions(self, T: int, device) -> Positions:
        """Positions of T new tokens per row: an int when all rows are aligned, else a (B, T) tensor."""
        if all(n == self._lengths[0] for n in self._lengths):
            return self._lengths[0]
        return torch.tensor(self._lengths, device=device)[:, None] + torch.arange(T, device=device)

    def check_room(self, end: int) -> None:
        if end > self.max_len:
            raise PoEError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}")

    def in_view(self, pos: Positions, T: int) -> int:
        """The slots in view once T tokens per row are written at pos: every slot in full view (a
        tensor pos), else up to the furthest written."""
        if isinstance(pos, int):
            return pos + T
        return self.max_len if self.full_view else int(pos.max()) + 1

    # --- writes ------------------------------------------------------------------------------------
    def _write(self, buf: torch.Tensor, value: torch.Tensor, pos: Positions, dim: int) -> int:
        """Write value (T along `dim`) into buf at positions pos; return the number of slots now in view."""
        T = value.size(dim)
        end = self.in_view(pos, T)
        if isinstance(pos, int):
            self.check_room(end)
            buf.narrow(dim, pos, T).copy_(value)
            return end
        if not self.full_view:
            self.check_room(end)
        rows = torch.arange(buf.size(0), device=buf.device)[:, None]
        if dim == 2:   # (B, G, L, D) <- (B, G, T, D)
            buf[rows, :, pos] = value.transpose(1, 2)
        else:          # (B, L, d) <- (B, T, d)
            buf[rows, pos] = value
        return end

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: Positions):
        """Write (B, G, T, D) keys/values at positions pos and return the layer's keys/values in view."""
        end = self._write(self.k[layer], k, pos, 2)
        self._write(self.v[layer], v, pos, 2)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def store_embeds(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        """Write (B, T, d) embeddings at pos; return each token's predecessor's embedding (B, T, d)."""
        self._write(self.embeds, x, pos, 1)
        return predecessors(self.embeds, x, pos)

    # --- rows --------------------------------------------------------------------------------------
    def rows(self, start: int, stop: int, lengths: list[int] | None = None) -> "KVCache":
        """Rows start..stop-1 as a cache of their own, sharing this cache's storage (writes go
        through), holding `lengths` tokens per row (0 when None)."""
        return self._view([k[start:stop] for k in self.k], [v[start:stop] for v in self.v],
                          self.embeds[start:stop], self.max_len, self.full_view,
                          [0] * (stop - start) if lengths is None else [int(n) for n in lengths])

    @torch.no_grad()
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots into row dst (which then holds `length` tokens)."""
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]
        self.embeds[dst, :length] = self.embeds[src, :length]
        self._lengths[dst] = length


def predecessors(embeds: torch.Tensor, x: torch.Tensor, pos: Positions) -> torch.Tensor:
    """Each new token's predecessor's embedding (zeros at position 0), from `embeds` (B, L, d) by
    position, which already holds the new tokens `x` (B, T, d) at `pos`."""
    if isinstance(pos, int):
        first = embeds[:, pos - 1:pos] if pos > 0 else torch.zeros_like(x[:, :1])
        return torch.cat([first, x[:, :-1]], 1)
    rows = torch.arange(x.size(0), device=x.device)[:, None]
    return embeds[rows, (pos - 1).clamp(min=0)] * (pos > 0).unsqueeze(-1)


def new_cache(model, batch: int, max_len: int) -> KVCache:
    """A cache for `model`, in its weights' dtype and on its device."""
    p = model.rope_cos
    dtype = next(model.parameters()).dtype
    return KVCache(model.config, batch, max_len, dtype=dtype, device=p.device)
