"""poegpt's out-of-tree vLLM plugin (SPEC §10): `vllm serve` an exported poegpt folder.

Installed with `pip install 'poegpt[vllm]'`, which declares the entry point

    [project.entry-points."vllm.general_plugins"]
    poegpt = "poegpt.vllm_plugin:register"

vLLM calls `register()` in every process it starts (API server, engine core, workers). It registers

- the architecture `PoEGPTForCausalLM` (the name `poegpt export-hf` writes into config.json) with
  vLLM's `ModelRegistry`, lazily, as `poegpt.vllm_plugin.model:PoEGPTForCausalLM`, so importing the
  plugin costs nothing until a poegpt model is loaded;
- the config class `PoEGPTConfig` for `model_type: "poegpt"` with transformers' `AutoConfig`, so
  the folder's config loads without `--trust-remote-code` (the tokenizer is a plain tokenizer.json).

Registering twice is harmless (vLLM loads plugins once per process, but may load them in many).
The model itself is in `model.py`; docs/vllm.md explains what it serves and how exactly.
"""

ARCHITECTURE = "PoEGPTForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..integrations.hf.remote.configuration_poegpt import PoEGPTConfig

    AutoConfig.register(PoEGPTConfig.model_type, PoEGPTConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, "poegpt.vllm_plugin.model:PoEGPTForCausalLM")
