"""Training objectives (docs/design.md §5): the chunked loss of `model_loss(model, x, y)` against fully materialised
references written from the formulas of docs/design.md §5.1, chunking invariance of losses and gradients, the
ignore index, and what `stage_grad="isolated"` and the residual stop-gradient do to gradients."""

import pytest
import torch
import torch.nn.functional as F

from poegpt.objectives import IGNORE_INDEX, model_loss

OBJECTIVES = [("residual_logop", 0.0), ("residual_logop", 0.5), ("joint_logop", 0.0), ("independent", 0.0),
              ("final_only", 0.0)]


def ce(logp, y):
    """Mean CE over the target tokens (y != -1) of log-probs (B, T, V)."""
    keep = y != IGNORE_INDEX
    nll = -logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return nll[keep].sum() / keep.sum()


def stage_logps(model, x, isolate=False):
    hs = model.trunk(x, isolate=isolate)
    return [F.log_softmax(model.stage_logits(h, k), -1) for k, h in enumerate(hs)]


def reference_loss(model, x, y, objective, local_weight=0.0, isolate=False):
    lps = stage_logps(model, x, isolate)
    K = len(lps)
    if objective == "residual_logop":
        total = ce(lps[0], y)
        for k in range(1, K):
            mixed = (sum(lp.detach() for lp in lps[:k]) + lps[k]) / (k + 1)
            total = total + ce(F.log_softmax(mixed, -1), y) + local_weight * ce(lps[k], y)
        return total / K
    if objective == "joint_logop":
        return ce(F.log_softmax(torch.stack(lps).mean(0), -1), y)
    if objective == "independent":
        return sum(ce(lp, y) for lp in lps) / K
    if objective == "final_only":
        return ce(lps[-1], y)
    raise AssertionError(objective)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def same_grads(a, b, names=None, rtol=1e-5, atol=1e-6):
    for n in (a if names is None else names):
        ga = torch.zeros(()) if a[n] is None else a[n]
        gb = torch.zeros(()) if b[n] is None else b[n]
        torch.testing.assert_close(ga.expand_as(gb) if ga.dim() == 0 else ga,
                                   gb.expand_as(ga) if gb.dim() == 0 else gb, rtol=rtol, atol=atol, msg=n)


def differ(a, b, names):
    def val(g):
        return torch.zeros(()) if g is None else g
    return any(not torch.allclose(val(a[n]), val(b[n]), rtol=1e-4, atol=1e-7) for n in names)


@pytest.fixture
def batch(token_batch):
    x = token_batch(2, 21, seed=5)
    y = token_batch(2, 21, seed=6)
    y[0, 3] = y[1, 10] = y[1, 20] = IGNORE_INDEX
    return x, y


@pytest.mark.parametrize("objective, lw", OBJECTIVES)
def test_loss_and_grads_match_the_reference(objective, lw, random_model, rebuild_model, batch):
    model = rebuild_model(random_model(seed=1), objective=objective, local_weight=lw)
    x, y = batch
    loss, stage_ce = model_loss(model, x, y, loss_chunk=7)
    g = grads(model, loss)
    ref = reference_loss(model, x, y, objective, lw)
    g_ref = grads(model, ref)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    same_grads(g, g_ref)
    # per-stage CE of each stage alone, NaN for stages the objective does not evaluate
    with torch.no_grad():
        lps = stage_logps(model, x)
    want = torch.tensor([ce(lp, y).item() for lp in lps])
    evaluated = slice(3, 4) if objective == "final_only" else slice(0, 4)
    torch.testing.assert_close(stage_ce[evaluated], want[evaluated], rtol=1e-5, atol=1e-5)
    assert stage_ce.shape == (4,) and not stage_ce.requires_grad
    if objective == "final_only":
        assert torch.isnan(stage_ce[:3]).all()


def test_objectives_are_distinct(random_model, rebuild_model, batch):
    x, y = batch
    base = random_model(seed=1)
    losses = {}
    for objective, lw in OBJECTIVES:
        with torch.no_grad():
            losses[(objective, lw)] = model_loss(rebuild_model(base, objective=objective, local_weight=lw), x, y)[0].item()
    values = sorted(losses.values())
    assert all(b - a > 1e-4 for a, b in zip(values, values[1:])), losses


@pytest.mark.parametrize("objective, lw", OBJECTIVES)
@pytest.mark.parametrize("stage_grad", ["through", "isolated"])
def test_chunked_equals_unchunked(objective, lw, stage_grad, random_model, rebuild_model, batch):
    model = rebuild_model(random_model(seed=2), objective=objective, local_weight=lw, stage_grad=stage_grad)
    x, y = batch
    loss_a, ce_a = model_loss(model, x, y, loss_chunk=7)         # 42 positions: 6 chunks of 7
    g_a = grads(model, loss_a)
    loss_b, ce_b = model_loss(model, x, y, loss_chunk=10**6)
    g_b = grads(model, loss_b)
    loss_c, _ = model_loss(model, x, y, loss_chunk=5)            # a ragged last chunk
    g_c = grads(model, loss_c)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_a, ce_b, rtol=1e-5, atol=1e-6, equal_nan=True)
    same_grads(g_a, g_b)
    same_grads(g_c, g_b)
    with torch.no_grad():                             # the no-grad path (no checkpointing) agrees
        torch.testing.assert_close(model_loss(model, x, y, loss_chunk=7)[0], loss_b.detach(), rtol=1e-5, atol=1e-6)


def test_fp64_model_matches_reference(random_model, rebuild_model, batch):
    """An fp64 model: the loss follows the reference to fp32 precision (logits are computed in fp32)."""
    model = rebuild_model(random_model(seed=3, dtype=torch.float64), objective="residual_logop", local_weight=0.5)
    x, y = batch
    loss, _ = model_loss(model, x, y, loss_chunk=7)
    ref = reference_loss(model, x, y, "residual_logop", 0.5)
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-6, atol=1e-6)


def test_ignored_positions_are_excluded(random_model, batch):
    model = random_model(seed=4)
    x, y = batch
    keep = y != IGNORE_INDEX
    assert (~keep).sum() == 3
    with torch.no_grad():
        loss, _ = model_loss(model, x, y, loss_chunk=7)
        lps = stage_logps(model, x)
        # the loss over the kept tokens only: not the mean over all positions
        assert loss.item() == pytest.approx(reference_loss(model, x, y, "residual_logop").item(), rel=1e-5)
        y_all = y.clone()
        y_all[~keep] = 0
        assert abs(model_loss(model, x, y_all)[0].item() - loss.item()) > 1e-5
        # ignored positions can hold anything: changing their inputs' targets to -1 elsewhere too
        y_more = y.clone()
        y_more[0, :10] = IGNORE_INDEX
        got = model_loss(model, x, y_more, loss_chunk=4)[0]
        torch.testing.assert_close(got, reference_loss(model, x, y_more, "residual_logop"), rtol=1e-5, atol=1e-6)
        # every target ignored: a finite zero loss, not NaN
        y_none = torch.full_like(y, IGNORE_INDEX)
        assert model_loss(model, x, y_none)[0].item() == 0.0
    assert len(lps) == 4


def test_final_only_trains_only_the_last_stage_head(random_model, rebuild_model, batch):
    x, y = batch
    base = random_model(seed=5)
    final = rebuild_model(base, objective="final_only")
    g = grads(final, model_loss(final, x, y)[0])
    for k in range(3):
        gk = g[f"lm_head_stages.{k}.weight"]
        assert gk is None or (gk == 0).all(), k
    assert g["lm_head_stages.3.weight"].abs().sum() > 0
    assert g["lm_head.weight"].abs().sum() > 0
    residual = rebuild_model(base, objective="residual_logop")
    g = grads(residual, model_loss(residual, x, y)[0])
    for k in range(4):
        assert g[f"lm_head_stages.{k}.weight"].abs().sum() > 0, k


def stage0_only_params(model):
    """Parameters used by stage 0 alone: its layers (0..3) with their value embeddings, its head."""
    b0 = model.config.boundaries[0]
    names = [n for n, _ in model.named_parameters()
             if (n.startswith("blocks.") and int(n.split(".")[1]) <= b0)
             or (n.startswith("value_embeds.") and int(n.split(".")[1]) <= b0)
             or n == "lm_head_stages.0.weight"]
    assert any(n.startswith("value_embeds.") for n in names)
    return names


def test_isolated_independent_stage0_layers_see_only_stage0_loss(random_model, rebuild_model, batch):
    x, y = batch
    base = random_model(seed=6)
    iso = rebuild_model(base, objective="independent", stage_grad="isolated")
    names = stage0_only_params(iso)
    g_model = grads(iso, model_loss(iso, x, y, loss_chunk=7)[0])
    g_stage0 = grads(iso, ce(stage_logps(iso, x)[0], y) / 4)
    same_grads(g_model, g_stage0, names)
    # layer 4 (stage 1) gets stage 1's loss (and, past it, nothing else reaches it)
    lps = stage_logps(iso, x, isolate=True)
    g_stage1 = grads(iso, ce(lps[1], y) / 4)
    same_grads(g_model, g_stage1, [n for n in g_model if n.startswith("blocks.4.")])
    # shared parameters still collect gradient from every stage
    assert differ(g_model, g_stage0, ["lm_head.weight", "wte.weight"])
    # with gradients flowing through, later stage losses reach the first layers
    thr = rebuild_model(base, objective="independent", stage_grad="through")
    g_thr = grads(thr, model_loss(thr, x, y, loss_chunk=7)[0])
    assert differ(g_thr, g_stage0, [n for n in names if n.startswith("blocks.0.")])
    # same forward value either way
    torch.testing.assert_close(model_loss(iso, x, y)[0], model_loss(thr, x, y)[0])


def test_isolated_detaches_backout_state(random_model, rebuild_model, batch):
    """x_mid (after layer 4, stage 1) feeds stages 2 and 3 through the backout: isolated cuts that."""
    x, y = batch
    iso = rebuild_model(random_model(seed=7), objective="independent", stage_grad="isolated")
    g_model = grads(iso, model_loss(iso, x, y)[0])
    lps = stage_logps(iso, x, isolate=True)
    g_stage1 = grads(iso, ce(lps[1], y) / 4)
    names = [n for n in g_model if n.startswith("blocks.4.") or n.startswith("blocks.5.")]
    same_grads(g_model, g_stage1, names)


def test_residual_logop_stop_gradient(random_model, rebuild_model, batch):
    """Under residual_logop + isolated, stage 0's own parameters get exactly CE(p_0)/K: the later
    terms see log p_0 only through sg(.)."""
    x, y = batch
    base = random_model(seed=8)
    for lw in (0.0, 0.5):
        iso = rebuild_model(base, objective="residual_logop", local_weight=lw, stage_grad="isolated")
        names = stage0_only_params(iso)
        g_model = grads(iso, model_loss(iso, x, y, loss_chunk=7)[0])
        g_stage0 = grads(iso, ce(stage_logps(iso, x)[0], y) / 4)
        same_grads(g_model, g_stage0, names)
    # without the stop-gradient (a joint Log-OP) the later terms would reach stage 0's head
    joint = rebuild_model(base, objective="joint_logop", stage_grad="isolated")
    g_joint = grads(joint, model_loss(joint, x, y)[0])
    assert differ(g_joint, g_stage0, ["lm_head_stages.0.weight"])
    # with gradients flowing through, stage 0's layers also learn from the later terms
    thr = rebuild_model(base, objective="residual_logop", stage_grad="through")
    g_thr = grads(thr, model_loss(thr, x, y)[0])
    assert differ(g_thr, g_stage0, [n for n in names if n.startswith("blocks.")])
    # ... but its head still sees only CE(p_0)/K (the stop-gradient, not the isolation, does that)
    same_grads(g_thr, g_stage0, ["lm_head_stages.0.weight"])


def test_residual_logop_by_hand_two_stages(random_model, rebuild_model, token_batch):
    """The formula of docs/design.md §5.1 on a 2-stage model, written with explicit probabilities."""
    from poegpt import PoEConfig
    cfg = PoEConfig.from_preset("tiny", stage_layout=(5, 3), objective="residual_logop", local_weight=0.25)
    model = random_model(cfg, seed=9)
    x, y = token_batch(1, 9, seed=9), token_batch(1, 9, seed=10)
    with torch.no_grad():
        loss, _ = model_loss(model, x, y)
        p0, p1 = [lp.exp() for lp in stage_logps(model, x)]
    prod = (p0 * p1).sqrt()
    P = prod / prod.sum(-1, keepdim=True)
    pick = lambda p: p[0, torch.arange(9), y[0]]  # noqa: E731
    want = (-pick(p0).log().mean() + (-pick(P).log().mean()) + 0.25 * (-pick(p1).log().mean())) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("objective, lw", [("residual_logop", 0.5), ("joint_logop", 0.0)])
def test_compiled_loss_equals_eager(objective, lw, random_model, rebuild_model, batch):
    model = rebuild_model(random_model(seed=4), objective=objective, local_weight=lw)
    x, y = batch
    loss_e, ce_e = model_loss(model, x, y, loss_chunk=21)
    g_e = grads(model, loss_e)
    loss_c, ce_c = model_loss(model, x, y, loss_chunk=21, compile_loss=True)
    g_c = grads(model, loss_c)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_c, ce_e, rtol=1e-5, atol=1e-6)
    same_grads(g_c, g_e)
