"""poegpt's vLLM model math (`poegpt/integrations/vllm/trunk.py`) against poegpt itself, without vLLM.

vLLM is not needed: the test plays vLLM's part on plain tensors. A fake paged KV cache is laid out as
vLLM's CPU backend lays it out (tests/paged.py, which tests/test_cache.py's conformance test also
drives), and a vLLM-like scheduler with a small token budget mixes prefill
chunks and decode steps of requests of different lengths that arrive at different steps, in a
shuffled order within each forward, with padding tokens after the real ones. Every token's log-probs
from the served model must equal those of `PoEModel` run on its request alone (the trunk walk
without a cache, then the mode table's `StageMix.logprobs`), for full PoE (also entropy-weighted)
and for the prefix, stage and composition variants chosen by config overrides.

Not bit for bit: a flat batch multiplies other numbers of rows at once than a request alone, and
the CPU's matmuls round a row differently for some row counts (one row takes a GEMV), so fp32
results differ in their last bits, and more after eight layers: up to 8.6e-6 on log-probs of about
-18 (an ulp there is 1.9e-6), 1.8e-6 relative to max(1, |log p|). The fp32 runs must agree within
5e-6 · max(1, |log p|); the same runs in fp64 must agree within 1e-12 (they do to 1.5e-14), which a
difference in the math could not.
"""

import math
import random
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from poegpt.errors import PoEError
from poegpt.integrations.vllm.trunk import (PagedCache, boundary_states, load_weights, logprobs, override_keys,
                                            served_mix, served_model)
from poegpt.modes import MODES, ModeSpec

from paged import FakePagedCache

BUDGET = 16        # tokens per forward (vLLM's max_num_batched_tokens): long prompts are prefilled in chunks
REQUESTS = [       # (arrival step, prompt length, total length)
    (0, 20, 26), (0, 5, 12), (1, 33, 37), (3, 1, 9), (4, 40, 46), (6, 17, 18)]
VARIANTS = [       # (config overrides, the native mode they serve)
    ({}, ("full", {})),
    ({"poe_max_stages": 2}, ("prefix", {"max_stages": 2})),
    ({"poe_stage": 1}, ("stage", {"stage": 1})),
    ({"poe_stages": [1]}, ("composition", {"stages": (1,)})),
    ({"poe_stages": [0, 2], "poe_stage_weights": [0.3, 1.0]}, ("composition", {"stages": (0, 2), "stage_weights": (0.3, 1.0)})),
]


TOLERANCE = {torch.float32: 5e-6, torch.float64: 1e-12}     # relative to max(1, |log p|): module docstring


@contextmanager
def default_dtype(dtype):
    """vLLM builds a model under its dtype as torch's default."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def hf_config(cfg, **overrides):
    """What vLLM hands the model: the folder's config with its --hf-overrides set as attributes."""
    return SimpleNamespace(to_poe_config=lambda: cfg, **overrides)


def schedule(requests, budget: int, seed: int = 0) -> list[list[tuple[int, int, int]]]:
    """vLLM-like forwards: per forward [(request, first position, number of tokens)]. A request past
    its prompt decodes one token per forward; a prompt takes what is left of the token budget."""
    rng = random.Random(seed)
    done, steps, step = [0] * len(requests), [], 0
    while any(d < total for d, (_, _, total) in zip(done, requests)):
        left, this = budget, []
        for i, (arrival, prompt, total) in enumerate(requests):
            if arrival > step or done[i] >= total or left == 0:
                continue
            n = min(prompt - done[i], left) if done[i] < prompt else 1
            this.append((i, done[i], n))
            done[i] += n
            left -= n
        rng.shuffle(this)
        steps.append(this)
        step += 1
    return steps


def serve(native, overrides: dict, tokens: list[list[int]]):
    """Run the requests through the served model as vLLM would: the log-probs of every token (L, V)."""
    cfg, dtype = native.config, native.lm_head.weight.dtype
    mix = served_mix(hf_config(cfg, **overrides), cfg)
    with default_dtype(dtype):
        model = served_model(cfg, mix.depth)
    checkpoint = [("model." + k, v) for k, v in native.state_dict().items()]
    assert load_weights(model, checkpoint) == {"model." + k for k, _ in model.named_parameters()}
    paged = FakePagedCache(cfg, len(model.blocks), dtype=dtype)
    out = [torch.full((len(t), cfg.vocab_size), math.nan, dtype=dtype) for t in tokens]
    for s, step in enumerate(schedule(REQUESTS, BUDGET)):
        ids, positions, cache = paged.forward(step, tokens, pad=2 * (s % 2))
        with torch.no_grad():
            lp = logprobs(model, mix, boundary_states(model, mix.depth, ids, cache))
        for (r, start, n), a in zip(step, cache.batch.starts):
            out[r][start:start + n] = lp[a:a + n]
    return mix, model, out


def assert_equal_logprobs(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to the rounding of a flat batch: |Δ| <= tolerance · max(1, |log p|) (module docstring)."""
    excess = ((got - want).abs() / want.abs().clamp(min=1)).max().item()
    assert excess <= TOLERANCE[want.dtype], f"log-probs differ by {excess:.1e} relative to their size"


@pytest.mark.parametrize("overrides, native_mode", VARIANTS, ids=["full", "prefix", "stage", "stage-as-composition",
                                                                    "composition"])
@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["G2", "G1"])      # the embeddings take one cache layer, or two
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_flat_batches_on_a_paged_cache_equal_each_request_alone(random_model, tiny_cfg, overrides, native_mode,
                                                               n_kv_head, dtype):
    native = random_model(tiny_cfg.replace(n_kv_head=n_kv_head), seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, tiny_cfg.vocab_size, (total,), generator=g).tolist() for _, _, total in REQUESTS]
    mix, model, got = serve(native, overrides, tokens)
    native_mix = ModeSpec(native_mode[0], **native_mode[1]).stage_mix(native)
    assert mix == native_mix
    assert len(model.blocks) == tiny_cfg.boundaries[mix.depth - 1] + 1 and len(model.lm_head_stages) == mix.depth
    for t, lp in zip(tokens, got):
        with torch.no_grad():
            assert_equal_logprobs(lp, native_mix.logprobs(native, native.trunk(torch.tensor([t]), mix.depth))[0])


def test_entropy_weighted_full_poe(random_model, rebuild_model, tiny_cfg):
    native = rebuild_model(random_model(tiny_cfg, seed=4), poe_alpha=0.7)
    tokens = [list(range(5, 5 + total)) for _, _, total in REQUESTS]
    mix, _, got = serve(native, {}, tokens)
    assert mix.alpha == 0.7 and mix == ModeSpec("full").stage_mix(native)
    for t, lp in zip(tokens, got):
        with torch.no_grad():
            assert_equal_logprobs(lp, native(torch.tensor([t]))[0])   # the model's forward: full PoE, alpha applied


def test_variants_are_the_mode_tables_batched_modes(tiny_cfg):
    batched = {m.name for m in MODES.values() if m.static and m.fields}
    assert set(override_keys()) == batched == {"prefix", "stage", "composition"}
    assert override_keys()["composition"] == ["poe_stages", "poe_stage_weights"]
    with pytest.raises(PoEError, match="select no single mode"):
        served_mix(hf_config(tiny_cfg, poe_max_stages=2, poe_stages=[0]), tiny_cfg)
    with pytest.raises(PoEError, match="needs stages"):
        served_mix(hf_config(tiny_cfg, poe_stage_weights=[1.0]), tiny_cfg)
    with pytest.raises(PoEError, match="max_stages"):
        served_mix(hf_config(tiny_cfg, poe_max_stages=9), tiny_cfg)


def test_a_slot_mapping_the_block_table_does_not_give_is_refused(tiny_cfg):
    paged = FakePagedCache(tiny_cfg, 1)
    _, _, cache = paged.forward([(0, 0, 3)], [[1, 2, 3]])
    layer = cache.layer("kv", 0)
    layer.slots = layer.slots.flip(0)
    with pytest.raises(PoEError, match="slot mapping"):
        layer.check(cache.batch)


def test_dummy_run_has_no_cache(random_model, tiny_cfg):
    """vLLM's profiling and warm-up forwards come without metadata: they run, store nothing."""
    native = random_model(tiny_cfg)
    model = served_model(tiny_cfg, tiny_cfg.n_stages)
    load_weights(model, [("model." + k, v) for k, v in native.state_dict().items()])
    ids = torch.arange(1, 9)
    positions = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        hidden = boundary_states(model, tiny_cfg.n_stages, ids, PagedCache(None, positions))
    assert hidden.shape == (8, tiny_cfg.n_stages * tiny_cfg.n_embd) and hidden.isfinite().all()
