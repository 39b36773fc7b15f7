"""poegpt: GPTs trained as a Product of Experts over depth.

    import poegpt
    model, tok = poegpt.load()                      # the shipped demo model, or poegpt.load("ckpt_dir")
    cfg = poegpt.PoEConfig.from_preset("tiny")
    model = poegpt.PoEGPT(cfg)
"""

from .config import PoEConfig
from .errors import PoEError
from .api import PoEGPT

__version__ = "0.1.0"
__all__ = ["PoEConfig", "PoEGPT", "PoEError", "load", "__version__"]


def load(path=None, device="cpu", dtype="auto"):
    """Load (model, tokenizer) from a checkpoint directory (the shipped demo model when None). dtype "auto":
    bf16 where the hardware computes it natively (CUDA with bf16, a CPU with AVX512_BF16 or AMX), else fp32."""
    from .checkpoint import load_model
    from .hardware import resolve_dtype
    return load_model(path, device=device, dtype=resolve_dtype(dtype, device))
