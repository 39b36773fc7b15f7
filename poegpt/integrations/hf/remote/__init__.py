"""The Hugging Face face of poegpt: a `PretrainedConfig` and a `PreTrainedModel` around `PoEGPT`.

These modules are ordinary parts of the package (importable as `poegpt.integrations.hf.remote.*`,
tested like the rest), and `poegpt export-hf` copies them, together with the poegpt modules they
import, into the exported folder, where `trust_remote_code=True` loads them without poegpt
installed. The export only rewrites their relative imports to point at the copied siblings
(`poegpt/integrations/hf/export.py`).
"""
