"""Log-OP combination (docs/design.md §4) against direct computations from per-stage softmaxes."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from poegpt import PoEError
from poegpt.logop import entropy, logop, logop_logits, logop_scores, normalise_weights

K, V = 4, 37


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    # stages of different sharpness, so that entropy weighting matters
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)[:, None, None, None]
    return torch.randn(K, 3, 5, V, generator=g, dtype=torch.float64) * scale


def direct_logop(logits, stages, weights):
    """log p_S from per-stage softmaxes, written out: p_S ∝ Π_k p_k^{w̄_k}."""
    w = torch.tensor([1.0] * len(stages) if weights is None else weights, dtype=torch.float64)
    w = w / w.sum()
    probs = [torch.softmax(logits[k], -1) for k in stages]
    unnorm = torch.ones_like(probs[0])
    for wk, p in zip(w, probs):
        unnorm = unnorm * p ** wk
    return torch.log(unnorm / unnorm.sum(-1, keepdim=True)), torch.log(unnorm)


CASES = [
    ([0], None), ([3], [2.0]), ([0, 1], None), ([1, 3], [1.0, 3.0]), ([0, 1, 2, 3], None),
    ([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4]), ([2, 0, 3], [0.5, 0.0, 3.0]), ([0, 1, 2], [5, 5, 5]),
]


@pytest.mark.parametrize("stages, weights", CASES)
def test_logop_matches_direct_product_of_softmaxes(logits, stages, weights):
    logps = [F.log_softmax(logits[k], -1) for k in stages]
    want, want_score = direct_logop(logits, stages, weights)
    got = logop(logps, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64))
    torch.testing.assert_close(logop_scores(logps, weights), want_score, rtol=1e-10, atol=1e-10)
    # one softmax over the weighted raw logits gives the same distribution (fp32 by design)
    torch.testing.assert_close(logop_logits([logits[k] for k in stages], weights), want,
                               rtol=1e-5, atol=1e-5)
    # ranking by the score is ranking by the normalised log-probs
    assert torch.equal(logop_scores(logps, weights).argmax(-1), got.argmax(-1))


def test_uniform_default_is_the_geometric_mean(logits):
    logps = [F.log_softmax(z, -1) for z in logits]
    torch.testing.assert_close(logop_scores(logps), torch.stack(logps).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logop(logps), logop(logps, [1, 1, 1, 1]), rtol=0, atol=0)
    geo = torch.exp(torch.stack(logps).mean(0))
    torch.testing.assert_close(logop(logps).exp(), geo / geo.sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)
    # the combination differs from every stage alone
    for lp in logps:
        assert (logop(logps) - lp).abs().max() > 1e-2


def test_weights_are_normalised(logits):
    logps = [F.log_softmax(z, -1) for z in logits[:3]]
    a = logop_scores(logps, [1.0, 2.0, 3.0])
    b = logop_scores(logps, [10.0, 20.0, 30.0])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, (logps[0] + 2 * logps[1] + 3 * logps[2]) / 6, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, logop_scores(logps))
    # a single stage with any positive weight is that stage
    torch.testing.assert_close(logop([logps[1]], [7.0]), logps[1], rtol=1e-12, atol=1e-12)
    # a zero weight drops the stage
    torch.testing.assert_close(logop(logps, [1.0, 0.0, 1.0]), logop([logps[0], logps[2]]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5])
def test_entropy_weighting_by_hand(logits, alpha):
    logps = [F.log_softmax(z, -1) for z in logits]
    score = torch.zeros(3, 5, V, dtype=torch.float64)
    for b in range(3):
        for t in range(5):
            H = [-(lp[b, t].exp() * lp[b, t]).sum().item() for lp in logps]
            w = [math.exp(-alpha * h) for h in H]
            w = [x / sum(w) for x in w]
            score[b, t] = sum(wk * lp[b, t] for wk, lp in zip(w, logps))
    torch.testing.assert_close(logop_scores(logps, alpha=alpha), score, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logop(logps, alpha=alpha), F.log_softmax(score, -1), rtol=1e-10, atol=1e-10)
    # sharper (lower-entropy) stages get more weight, so it is not the plain geometric mean
    assert (logop(logps, alpha=alpha) - logop(logps)).abs().max() > 1e-3


def test_alpha_zero_is_plain_geometric_mean(logits):
    logps = [F.log_softmax(z, -1) for z in logits]
    torch.testing.assert_close(logop(logps, alpha=0.0), logop(logps), rtol=0, atol=0)


def test_entropy_helper(logits):
    lp = F.log_softmax(logits[0], -1)
    torch.testing.assert_close(entropy(lp), -(lp.exp() * lp).sum(-1))
    uniform = torch.full((V,), -math.log(V), dtype=torch.float64)
    assert entropy(uniform).item() == pytest.approx(math.log(V))


def test_logop_logits_equals_logop_of_log_softmaxes(logits):
    zs = [z.float() + 3.0 * k for k, z in enumerate(logits)]   # per-stage constant shifts do not matter
    want = logop([F.log_softmax(z, -1) for z in zs], [1.0, 2.0, 0.5, 1.5])
    got = logop_logits(zs, [1.0, 2.0, 0.5, 1.5])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logop_logits(zs), logop([F.log_softmax(z, -1) for z in zs]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights, n", [
    ([1.0, 2.0], 3), ([1.0], 2), ([1.0, -0.5, 1.0], 3), ([0.0, 0.0], 2), ([float("nan"), 1.0], 2),
])
def test_bad_weights_raise_naming_stage_weights(weights, n):
    with pytest.raises(PoEError, match="stage_weights"):
        normalise_weights(weights, n)


def test_logop_rejects_bad_inputs(logits):
    logps = [F.log_softmax(z, -1) for z in logits]
    with pytest.raises(PoEError, match="stage_weights"):
        logop(logps, [1.0, 1.0])
    with pytest.raises(PoEError, match="stage_weights"):
        logop(logps, [0, 0, 0, 0])
    with pytest.raises(PoEError):
        logop([])
    with pytest.raises(PoEError):
        logop(logps, [1, 1, 1, 1], alpha=1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=6)
       .filter(lambda w: sum(w) > 0))
def test_normalise_weights_property(weights):
    w = normalise_weights(weights, len(weights))
    assert len(w) == len(weights)
    assert sum(w) == pytest.approx(1.0)
    assert all(x >= 0 for x in w)
    big = max(range(len(weights)), key=lambda i: weights[i])
    assert w[big] == max(w)
    assert normalise_weights(None, len(weights)) == [1 / len(weights)] * len(weights)
