"""`PoEGPTConfig`: a `PoEConfig` in the form transformers expects (docs/design.md §10.3).

Every `PoEConfig` field is stored, the architecture ones under transformers' standard names
(`num_hidden_layers`, `hidden_size`, ...) so that generic tooling (generation, caches, lm-eval's
context length) reads them; `attribute_map` keeps poegpt's names working too. The model rebuilds its
`PoEConfig` through `to_poe_config()`, which runs poegpt's own validation. WAND bounds and the
speculative auto-draft thresholds measured by `poegpt calibrate` travel here as well, so that the
calibrated modes work on a loaded model without arguments.

No `sliding_window` attribute: transformers would then build sliding-window cache layers that drop
old keys, while the model applies its SSSL windows itself and needs every key in the cache.
"""

from transformers import PretrainedConfig

from ....config import PoEConfig

# poegpt field -> transformers' name for it
HF_NAMES = {
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "sequence_len": "max_position_embeddings",
    "extra": "poegpt_extra",
}


class PoEGPTConfig(PretrainedConfig):
    model_type = "poegpt"
    attribute_map = {name: hf for name, hf in HF_NAMES.items() if name != "extra"}

    def __init__(self, wand_p99_bounds=None, speculative_agreement=None, **kwargs):
        defaults = PoEConfig().to_dict()
        for name, default in defaults.items():
            key = HF_NAMES.get(name, name)
            value = kwargs.pop(key, default)
            if isinstance(value, tuple):
                value = list(value)
            setattr(self, key, value)
        self.wand_p99_bounds = None if wand_p99_bounds is None else [float(b) for b in wand_p99_bounds]
        self.speculative_agreement = None if speculative_agreement is None else \
            {str(k): float(v) for k, v in speculative_agreement.items()}
        kwargs.setdefault("tie_word_embeddings", False)   # the heads are separate matrices
        super().__init__(**kwargs)

    def to_poe_config(self) -> PoEConfig:
        """The poegpt config these fields describe (validated by `PoEConfig`)."""
        return PoEConfig.from_dict({name: getattr(self, HF_NAMES.get(name, name)) for name in PoEConfig().to_dict()})

    @classmethod
    def from_poe_config(cls, config: PoEConfig, **kwargs) -> "PoEGPTConfig":
        return cls(**{HF_NAMES.get(k, k): v for k, v in config.to_dict().items()}, **kwargs)
