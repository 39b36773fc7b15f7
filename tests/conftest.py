"""Shared fixtures: the tiny config and randomly perturbed tiny models.

`init_weights` zeroes both c_proj of every block and the stage heads, so on a freshly built model
many code paths are trivially equal (every stage predicts with the shared head, attention and MLP
add nothing). Tests that compare paths therefore use `random_model(cfg, seed)`, which adds small
Gaussian noise to every parameter.
"""

import pytest
import torch

from poegpt import PoEConfig, PoEGPT, hardware

# What `--dtype auto` sees in tests: a CPU without native bf16 (so auto is fp32 on every host, and no
# test depends on which CPU runs it); the tests of dtype resolution pass their own CPU descriptions.
TEST_CPU = {"model": "test CPU (AVX2)", "flags": ["avx2", "fma"], "capability": "AVX2", "cores": 2}


@pytest.fixture(autouse=True)
def _fixed_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu", lambda: TEST_CPU)


def build_random_model(cfg: PoEConfig | None = None, seed: int = 0, scale: float = 0.1,
                       head_scale: float = 0.3, dtype=torch.float32) -> PoEGPT:
    cfg = PoEConfig.from_preset("tiny") if cfg is None else cfg
    torch.manual_seed(seed)
    model = PoEGPT(cfg)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = head_scale if name.startswith("lm_head") else scale
            p.add_(s * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.to(dtype).eval()


def rebuild(model: PoEGPT, **changes) -> PoEGPT:
    """The same weights under a config with `changes` (objective, stage_grad, poe_alpha, ...)."""
    dtype = next(model.parameters()).dtype
    new = PoEGPT(model.config.replace(**changes)).to(dtype)
    new.load_state_dict(model.state_dict())
    return new.eval()


@pytest.fixture
def tiny_cfg() -> PoEConfig:
    return PoEConfig.from_preset("tiny")


@pytest.fixture
def random_model():
    """Factory fixture: random_model(cfg=None, seed=0, dtype=torch.float32) -> perturbed PoEGPT."""
    return build_random_model


@pytest.fixture
def rebuild_model():
    return rebuild


@pytest.fixture
def token_batch():
    """Factory fixture: token_batch(B, T, seed, vocab=512) -> (B, T) random token ids."""
    def make(B=2, T=24, seed=0, vocab=512):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (B, T), generator=g)
    return make
