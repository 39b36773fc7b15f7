"""poegpt's out-of-tree vLLM plugin: `vllm serve` an exported poegpt folder (docs/vllm.md).

Installed with `pip install 'poegpt[vllm]'`, which declares the entry point

    [project.entry-points."vllm.general_plugins"]
    poegpt = "poegpt.integrations.vllm:register"

vLLM calls `register()` in every process it starts (API server, engine core, workers). It registers

- the architecture `PoEGPTForCausalLM` (the name `poegpt export-hf` writes into config.json) with
  vLLM's `ModelRegistry`, lazily, as `poegpt.integrations.vllm.model:PoEGPTForCausalLM`, so importing
  the plugin costs nothing until a poegpt model is loaded;
- the config class `PoEGPTConfig` for `model_type: "poegpt"` with transformers' `AutoConfig`, so
  the folder's config loads without `--trust-remote-code` (the tokenizer is a plain tokenizer.json).

Registering twice is harmless (vLLM loads plugins once per process, but may load them in many).
`model.py` hooks the model up to vLLM; its math is in `trunk.py`, which imports no vLLM.
"""

ARCHITECTURE = "PoEGPTForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..hf.remote.configuration_poegpt import PoEGPTConfig

    AutoConfig.register(PoEGPTConfig.model_type, PoEGPTConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, "poegpt.integrations.vllm.model:PoEGPTForCausalLM")
