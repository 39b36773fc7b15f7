"""Front ends that put poegpt inside other frameworks: `hf/` (the Hugging Face export and import
and the transformers wrapper it ships) and `vllm/` (the vLLM plugin). Each subpackage imports its
framework lazily or in modules of its own, so importing poegpt never needs one installed.
"""
