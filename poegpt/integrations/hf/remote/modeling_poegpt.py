"""`PoEGPTForCausalLM`: poegpt's `PoEGPT` as a transformers causal LM (docs/design.md §10.3).

The wrapper owns one `PoEGPT` (`self.model`) and adds nothing to its computation:

- `forward` runs the trunk and returns the full-PoE **normalised log-probs** as `logits` (B, T, V),
  computed by the engine's own `StageMix.full` (the distribution poegpt's `generate` picks from), so
  transformers' greedy search and samplers (temperature, top-k, top-p) act on the PoE distribution.
- The KV cache is transformers' (`DynamicCache`). `CacheView` is a form of poegpt's cache
  contract over it (`positions`, `store`, `store_embeds`, `lengths`, `advance`: what the trunk walk
  calls; tests/test_cache.py runs it with the other forms), so the attention, the SSSL windows, the
  smear gate and the value embeddings are the trunk's own code. Besides one
  cache layer per transformer layer, one extra layer holds every position's normed token embedding,
  which the smear gate of the next position reads; keeping it inside the cache means reordering,
  cropping and batch selection by transformers apply to it too.
- Positions come from the cache (`get_seq_length()`) and the attention mask, never from an
  argument that a caller may not pass: transformers 5.24 hands the cache over as `cache=`, 5.19 as
  `past_key_values=`; both are accepted, and a forward that ignored the cache would generate wrong
  text without any error.
- Padded batches: a row's positions count its real tokens only. The trunk's attention treats key
  index i as position i, so for a padded batch `CacheView` hands it each row's real keys first, in
  order (a stable gather), with padding slots after them, where causality already hides them.
  A left-padded row thus computes exactly what the same prompt computes alone.
- The six inference modes are `PoEGPT`'s methods, delegated with their signatures unchanged; the
  WAND bounds and speculative thresholds stored in the config feed them as a checkpoint's would.
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ....api import PoEGPT
from ....cache import RowLengths, predecessors
from ....config import Calibration
from ....engine import StageMix
from ....errors import PoEError
from ....model import rotary_tables
from .configuration_poegpt import PoEGPTConfig

# transformers 5.24 names the output's cache field `cache`; 5.19 `past_key_values`
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def check_cache(cache) -> None:
    """A transformers cache the trunk can use: dynamic layers, every key kept (no sliding window, not static)."""
    if not isinstance(cache, Cache):
        raise PoEError("the cache must be a transformers Cache such as DynamicCache; tuples of tensors are not supported")
    layers = getattr(cache, "layers", None)
    if layers is None or any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in layers):
        # static and sliding-window layers keep keys at other slots than the trunk's positions
        raise PoEError(f"poegpt needs a DynamicCache (cache_implementation None or 'dynamic'), got {type(cache).__name__}")


class CacheView(RowLengths):
    """poegpt's cache contract (`cache.py`) over a transformers `Cache`.

    The transformers cache appends every row's new slots in arrival order, so the rows hold equal
    numbers of slots. `lengths` are the tokens each row holds (padding not counted; every slot when
    there is none), read-only and moved by `advance`; new tokens go at positions `lengths[b] + 0..T-1`.
    A padded forward (the wrapper's, one view per call) passes its own `positions` for the new tokens
    and `order` (B, S): per row, the cache slots of real tokens first (in order) and padding slots
    after them. Without padding the slots are the positions and one view serves any number of calls."""

    full_view = False

    def __init__(self, cache: Cache, n_layer: int, batch_size: int, lengths: list[int] | None = None,
                 positions=None, order: torch.Tensor | None = None):
        self.cache, self.n_layer, self.order = cache, n_layer, order
        self._positions = positions
        self._lengths = [cache.get_seq_length()] * batch_size if lengths is None else [int(n) for n in lengths]
        if getattr(cache, "layer_class_to_replicate", None) is None:
            while len(cache.layers) <= n_layer:   # a cache built from the config has no slot for the embeddings yet
                cache.layers.append(DynamicLayer())

    def advance(self, n) -> None:
        super().advance(n)
        self._positions = None      # a padded forward's positions were for its own tokens only

    def positions(self, T: int, device):
        """Positions of T new tokens per row: the padded forward's own, else an int (rows aligned)."""
        if self._positions is not None:
            return self._positions
        if any(n != self._lengths[0] for n in self._lengths):
            raise PoEError("rows of a transformers cache view hold different lengths; pass the attention mask")
        return self._lengths[0]

    def _by_position(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.order is None:
            return t
        if dim == 2:      # keys/values (B, G, S, D)
            index = self.order[:, None, :, None].expand(t.size(0), t.size(1), -1, t.size(3))
        else:             # embeddings (B, S, d)
            index = self.order[:, :, None].expand(-1, -1, t.size(2))
        return t.gather(dim, index)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos):
        k, v = self.cache.update(k, v, layer)
        return self._by_position(k, 2), self._by_position(v, 2)

    def store_embeds(self, x: torch.Tensor, pos):
        """The (B, T, d) normed token embeddings, kept as the keys of the extra layer (with zero-width
        values); returns each token's predecessor's embedding."""
        e, _ = self.cache.update(x[:, None], x[:, None, :, :0], self.n_layer)
        return predecessors(self._by_position(e[:, 0], 1), x, pos)


def _delegate(name: str):
    """PoEGPT's method `name`, called on the wrapped model: same signature, same docstring."""
    method = getattr(PoEGPT, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return getattr(self.model, name)(*args, **kwargs)
    return call


class PoEGPTPreTrainedModel(PreTrainedModel):
    config_class = PoEGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["PoEGPT"]          # one device for the whole trunk (device_map="auto")
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        # Weights come from model.safetensors, or from PoEGPT's own initialisation for a new model.
        # The rotary tables are non-persistent buffers, left empty by a meta-device load: recompute them,
        # in the weights' dtype, as `PoEGPT.to(dtype)` leaves them in poegpt (bf16 tables for a bf16 model).
        if isinstance(module, PoEGPT):
            cfg = module.config
            device = module.rope_cos.device
            if device.type != "meta":
                cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base, device=device)
                module.rope_cos = cos.to(module.wte.weight.dtype)
                module.rope_sin = sin.to(module.wte.weight.dtype)


class PoEGPTForCausalLM(PoEGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: PoEGPTConfig):
        super().__init__(config)
        self.model = PoEGPT(config.to_poe_config())
        calibration = {}
        if config.wand_p99_bounds is not None:
            calibration["wand_p99_bounds"] = list(config.wand_p99_bounds)
        if config.speculative_agreement:
            calibration["speculative_agreement"] = dict(config.speculative_agreement)
        self.model.calibration = Calibration.from_meta(calibration)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return None      # K + 1 head matrices (shared + per stage), none of them tied to the embedding

    # --- positions and padding ---------------------------------------------------------------------
    @staticmethod
    def _layout(attention_mask, past: int, T: int, device):
        """(tokens each row holds, positions of the T new tokens, slot order) from the cache length and
        the attention mask; all None without padding (the view counts the cache's slots)."""
        if attention_mask is None or bool(attention_mask.all()):
            return None, None, None
        if attention_mask.dim() != 2 or attention_mask.size(1) != past + T:
            raise PoEError(f"attention_mask must be (batch, cached + new tokens) = (B, {past + T}), got "
                           f"{tuple(attention_mask.shape)}; pass the 2-D mask of every token seen so far")
        real = attention_mask.to(device).bool()
        positions = (real.long().cumsum(1) - 1)[:, past:].clamp(min=0)       # padding sits at its row's start
        order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
        return real[:, :past].sum(1).tolist(), positions, order

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, cache: Cache | None = None, use_cache: bool | None = None,
                position_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, inputs_embeds: torch.Tensor | None = None, **kwargs):
        """Full-PoE log-probs (B, T, V) as `logits`, with transformers' KV cache.

        `position_ids` are accepted for compatibility and not used: positions follow from the cache
        length and the attention mask (a row's real tokens only). With `labels`, `loss` is the mean
        full-PoE negative log-likelihood of the next token (labels shifted inside, -100 ignored)."""
        if inputs_embeds is not None:
            raise PoEError("inputs_embeds is not supported: the smear gate and value embeddings read token ids")
        if input_ids is None:
            raise PoEError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if cache is not None:
            check_cache(cache)
        if cache is None and use_cache:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        held, positions, order = self._layout(attention_mask, past, T, input_ids.device)
        work = cache if cache is not None or order is None else DynamicCache()   # padding needs a cache to reorder
        view = None if work is None else CacheView(work, self.model.config.n_layer, B, held, positions, order)
        hs = self.model.trunk(input_ids, cache=view)
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hs = [h[:, -logits_to_keep:] for h in hs]
        else:
            hs = [h[:, logits_to_keep] for h in hs]
        cfg = self.model.config
        logprobs = StageMix.full(cfg.n_stages, cfg.poe_alpha).logprobs(self.model, hs)
        loss = None
        if labels is not None:
            if logprobs.size(1) != T:
                raise PoEError("labels need the log-probs of every position; leave logits_to_keep at 0")
            loss = F.nll_loss(logprobs[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logprobs.device),
                              ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logprobs, **{CACHE_FIELD: cache if use_cache else None})

    # --- the six inference modes (docs/design.md §7): poegpt's own methods on the wrapped model -------
    # Full PoE is `generate` (transformers' loop over `forward`); `self.model.generate` is poegpt's.
    forward_stage = _delegate("forward_stage")
    generate_prefix = _delegate("generate_prefix")
    generate_stage = _delegate("generate_stage")
    generate_wand = _delegate("generate_wand")
    generate_speculative = _delegate("generate_speculative")
    generate_parallel_composition = _delegate("generate_parallel_composition")
