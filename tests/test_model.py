"""Config, presets and the PoEGPT model (docs/design.md §3), on tiny random configs.

Parity tests compare the model against a from-scratch reference written here from docs/design.md §3.2 (fp64),
and generation against re-running the full forward; the KV-cache path against the no-cache path is
tests/test_cache.py's.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from poegpt import PoEConfig, PoEError, PoEGPT
from poegpt.config import card_stage_layout
from poegpt.cache import KVCache
from poegpt.model import TrunkState, attention_mask

CARD_PARAMS = 1_507_591_082


# ---------------------------------------------------------------------------------------------
# config and presets
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def meta_1_5b():
    cfg = PoEConfig.from_preset("1.5b")
    with torch.device("meta"):
        model = PoEGPT(cfg)
    return model


def test_1_5b_preset_has_the_cards_architecture():
    cfg = PoEConfig.from_preset("1.5b")
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == \
        (48_000, 24, 1536, 12, 6, 128)
    assert cfg.sequence_len == 2048
    assert cfg.stage_layout == (12, 5, 4, 3)
    assert cfg.boundaries == (11, 16, 20, 23)
    assert cfg.n_stages == 4
    assert cfg.softcap == 15.0
    assert cfg.router in (None, "disabled")
    assert cfg.padded_vocab_size == 48_000
    assert cfg.backout_layer == 12


def test_1_5b_parameter_count_is_exact_on_meta(meta_1_5b):
    assert all(p.device.type == "meta" for p in meta_1_5b.parameters())
    assert meta_1_5b.num_params() == CARD_PARAMS
    assert sum(p.numel() for p in meta_1_5b.parameters()) == CARD_PARAMS


def test_1_5b_per_component_counts_match_the_card(meta_1_5b):
    V, d, L, kv = 48_000, 1536, 24, 6 * 128
    counts = {"wte": 0, "shared": 0, "stages": 0, "blocks": 0, "ve": 0, "ve_gate": 0, "scalars": 0}
    for name, p in meta_1_5b.named_parameters():
        if name.startswith("wte."):
            counts["wte"] += p.numel()
        elif name.startswith("lm_head_stages."):
            counts["stages"] += p.numel()
        elif name.startswith("lm_head."):
            counts["shared"] += p.numel()
        elif name.startswith("value_embeds."):
            counts["ve"] += p.numel()
        elif ".ve_gate." in name:
            counts["ve_gate"] += p.numel()
        elif name.startswith("blocks."):
            counts["blocks"] += p.numel()
        else:
            counts["scalars"] += p.numel()
    assert counts == {
        "wte": 73_728_000,
        "shared": 73_728_000,
        "stages": 294_912_000,
        "blocks": 622_854_144,
        "ve": 442_368_000,
        "ve_gate": 864,
        "scalars": 48 + 26,
    }
    assert counts["blocks"] == L * (d * d + 2 * d * kv + d * d + 2 * d * 4 * d)
    assert counts["ve"] == 12 * V * kv
    by = meta_1_5b.params_by_component()
    assert by["total"] == CARD_PARAMS
    assert by["wte"] == 73_728_000 and by["lm_head (shared)"] == 73_728_000
    assert by["lm_head_stages"] == 294_912_000 and by["blocks"] == 622_854_144
    assert by["value_embeds"] == 442_368_000 and by["ve_gates"] == 864 and by["scalars"] == 74
    assert len(meta_1_5b.lm_head_stages) == 4
    assert sorted(int(k) for k in meta_1_5b.value_embeds) == list(range(1, 24, 2))


def test_1_5b_windows_and_value_embedding_layers():
    cfg = PoEConfig.from_preset("1.5b")
    assert cfg.short_window == 512
    assert cfg.windows == (512, 512, 512, 2048) * 6
    assert cfg.windows[-1] == 2048
    assert [i for i in range(24) if cfg.has_value_embed(i)] == list(range(1, 24, 2))


def test_tiny_preset(tiny_cfg):
    model = PoEGPT(tiny_cfg)
    assert model.num_params() < 1_000_000
    assert tiny_cfg.n_stages == 4
    assert tiny_cfg.n_kv_head < tiny_cfg.n_head and tiny_cfg.n_head % tiny_cfg.n_kv_head == 0
    assert tiny_cfg.window_pattern == "SSSL"
    assert tiny_cfg.boundaries == (3, 5, 6, 7)
    assert tiny_cfg.short_window == 16                    # a quarter of 64
    assert tiny_cfg.windows == (16, 16, 16, 64, 16, 16, 16, 64)
    assert tiny_cfg.extra.get("preset") == "tiny"


def test_last_layer_is_always_long():
    cfg = PoEConfig.from_preset("tiny", n_layer=6, stage_layout=(3, 1, 1, 1))
    assert cfg.windows == (16, 16, 16, 64, 16, 64)        # SSSL SS, last forced to L
    cfg = PoEConfig.from_preset("tiny", window_pattern="S")
    assert cfg.windows == (16,) * 7 + (64,)
    cfg = PoEConfig.from_preset("tiny", window_pattern="L")
    assert cfg.windows == (64,) * 8


@pytest.mark.parametrize("seq, short", [(2048, 512), (4096, 1024), (1000, 256), (64, 16), (8, 2)])
def test_short_window_is_a_quarter_rounded_up(seq, short):
    assert PoEConfig.from_preset("tiny", sequence_len=seq).short_window == short


def test_stage_boundaries_and_stage_of_layer():
    cfg = PoEConfig.from_preset("1.5b")
    assert [cfg.stage_of_layer(i) for i in range(24)] == [0] * 12 + [1] * 5 + [2] * 4 + [3] * 3
    tiny = PoEConfig.from_preset("tiny")
    assert [tiny.stage_of_layer(i) for i in range(8)] == [0, 0, 0, 0, 1, 1, 2, 3]


def test_depth_dial_24_is_the_card():
    assert PoEConfig.from_depth(24) == PoEConfig.from_preset("1.5b")
    assert card_stage_layout(24) == (12, 5, 4, 3)


@pytest.mark.parametrize("n", range(4, 41))
def test_card_stage_layout_is_sensible(n):
    layout = card_stage_layout(n)
    assert len(layout) == 4
    assert all(s >= 1 for s in layout)
    assert sum(layout) == n
    if n >= 12:  # stage 0 holds about half the layers, as in the card
        assert abs(layout[0] - n / 2) <= 1
    cfg = PoEConfig.from_depth(n)
    assert cfg.stage_layout == layout and cfg.n_layer == n
    assert cfg.n_head % cfg.n_kv_head == 0 and cfg.n_kv_head < cfg.n_head


@pytest.mark.parametrize("n", [4, 8, 9, 11, 12, 13, 20, 24, 25, 32])
def test_depth_dial_attention_is_as_wide_as_the_model(n):
    """nanochat's dial rounds the width 64*n up to a multiple of the head dim, so the heads span
    the residual width (n_head * head_dim == n_embd); heads of 128 on a width of 576 would not."""
    cfg = PoEConfig.from_depth(n)
    assert cfg.n_embd >= 64 * n
    assert cfg.n_embd % cfg.head_dim == 0
    assert cfg.n_head * cfg.head_dim == cfg.n_embd, (cfg.n_embd, cfg.n_head, cfg.head_dim)


def test_from_depth_rejects_too_shallow():
    with pytest.raises(PoEError, match="depth"):
        PoEConfig.from_depth(3)


def test_json_round_trip(tmp_path):
    for cfg in (PoEConfig.from_preset("tiny"), PoEConfig.from_preset("1.5b"),
                PoEConfig.from_preset("tiny", objective="joint_logop", local_weight=0.5, stage_grad="isolated",
                                      poe_alpha=1.0, router="disabled", window_pattern="SL")):
        text = cfg.to_json()
        back = PoEConfig.from_dict(json.loads(text))
        assert back == cfg
        assert back.extra == cfg.extra
        assert isinstance(back.stage_layout, tuple)
        (tmp_path / "config.json").write_text(text)
        assert PoEConfig.load(tmp_path) == cfg                     # a checkpoint directory
        assert PoEConfig.load(tmp_path / "config.json") == cfg     # or the file itself
    assert PoEConfig.from_dict(PoEConfig.from_preset("tiny").to_dict()) == PoEConfig.from_preset("tiny")


def test_load_errors(tmp_path):
    with pytest.raises(PoEError, match="no config"):
        PoEConfig.load(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PoEError, match="not valid JSON"):
        PoEConfig.load(tmp_path)
    with pytest.raises(PoEError):
        PoEConfig.from_dict([1, 2])


@pytest.mark.parametrize("changes, field", [
    (dict(stage_layout=(4, 2, 1)), "stage_layout"),
    (dict(stage_layout=(4, 2, 1, 2)), "stage_layout"),
    (dict(stage_layout=(8, 0, 0)), "stage_layout"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(window_pattern="SSXL"), "window_pattern"),
    (dict(window_pattern=""), "window_pattern"),
    (dict(objective="dense"), "objective"),
    (dict(router="top2"), "router"),
    (dict(local_weight=-0.1), "local_weight"),
    (dict(poe_alpha=-1.0), "poe_alpha"),
    (dict(stage_grad="sometimes"), "stage_grad"),
    (dict(softcap=0.0), "softcap"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
])
def test_bad_config_values_raise_naming_the_field(changes, field):
    with pytest.raises(PoEError, match=field):
        PoEConfig.from_preset("tiny", **changes)
    d = {**PoEConfig.from_preset("tiny").to_dict(), **changes}
    with pytest.raises(PoEError, match=field):
        PoEConfig.from_dict(d)


def test_unknown_preset_and_unknown_json_field():
    with pytest.raises(PoEError, match="preset"):
        PoEConfig.from_preset("7b")
    d = PoEConfig.from_preset("tiny").to_dict()
    d["n_experts"] = 3
    with pytest.raises(PoEError, match="n_experts"):
        PoEConfig.from_dict(d)


def test_router_accepts_only_disabled():
    assert PoEConfig.from_preset("tiny", router="disabled").router == "disabled"
    assert PoEConfig.from_preset("tiny", router=None).router is None


def test_config_is_frozen(tiny_cfg):
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_cfg.n_layer = 3


# ---------------------------------------------------------------------------------------------
# a from-scratch reference trunk (docs/design.md §3.2), for parity
# ---------------------------------------------------------------------------------------------

def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def reference_trunk(model, idx):
    """Normed boundary states [norm(h_k)] computed directly from docs/design.md §3.2's description."""
    cfg = model.config
    B, T = idx.shape
    H, G, D, L = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer
    x = rms(model.wte.weight[idx])
    gate = model.smear_lambda * torch.sigmoid(x[..., :24] @ model.smear_gate.weight.T)     # (B, T, 1)
    x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
    x0 = x
    dt = x.dtype
    # the rotary tables are built in fp32 (whatever the model's dtype), so build them so here too
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]                      # (T, D/2)
    cos, sin = ang.cos().to(dt)[None, :, None], ang.sin().to(dt)[None, :, None]

    def rope(u):  # nanochat rotates each half-pair by -theta
        u1, u2 = u[..., : D // 2], u[..., D // 2:]
        return torch.cat([u1 * cos + u2 * sin, -u1 * sin + u2 * cos], dim=-1)

    t = torch.arange(T)
    outs, x_mid = [], None
    for i in range(L):
        blk = model.blocks[i]
        a = blk.attn
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        xn = rms(x)
        q = (xn @ a.c_q.weight.T).view(B, T, H, D)
        k = (xn @ a.c_k.weight.T).view(B, T, G, D)
        v = (xn @ a.c_v.weight.T).view(B, T, G, D)
        if i % 2 == (L - 1) % 2:
            g = 3 * torch.sigmoid(xn[..., :12] @ a.ve_gate.weight.T)                          # (B, T, G)
            v = v + g[..., None] * model.value_embeds[str(i)].weight[idx].view(B, T, G, D)
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        w = cfg.windows[i]
        allowed = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] <= w)                # (T query, T key)
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * D)
        x = x + y @ a.c_proj.weight.T
        x = x + F.relu(rms(x) @ blk.mlp.c_fc.weight.T).square() @ blk.mlp.c_proj.weight.T
        if i == L // 2:
            x_mid = x
        if i in cfg.boundaries:
            outs.append(rms(x - model.backout_lambda * x_mid if i >= L // 2 else x))
    return outs


def reference_logits(model, h, k):
    z = h @ (model.lm_head.weight + model.lm_head_stages[k].weight).T
    return 15.0 * torch.tanh(z[..., : model.config.vocab_size] / 15.0)


def test_trunk_matches_reference_fp64(random_model, token_batch):
    model = random_model(seed=1, dtype=torch.float64)
    idx = token_batch(2, 40, seed=1)                      # longer than the short window (16)
    with torch.no_grad():
        got, want = model.trunk(idx), reference_trunk(model, idx)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_reference_is_sensitive(random_model, token_batch):
    """The parity test above can fail: perturbing one trunk scalar moves the reference."""
    model = random_model(seed=1, dtype=torch.float64)
    idx = token_batch(2, 40, seed=1)
    with torch.no_grad():
        got = model.trunk(idx)
        model.x0_lambdas[5] += 1e-3
        want = reference_trunk(model, idx)
    assert not torch.allclose(got[-1], want[-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)   # layer 5 is past stage 0


def test_forward_returns_normalised_full_poe(random_model, token_batch):
    model = random_model(seed=2, dtype=torch.float64)
    idx = token_batch(2, 30, seed=2)
    with torch.no_grad():
        out = model(idx)
        hs = reference_trunk(model, idx)
    assert out.shape == (2, 30, 512)
    torch.testing.assert_close(out.double().exp().sum(-1), torch.ones(2, 30, dtype=torch.float64))
    logps = [F.log_softmax(reference_logits(model, h, k), -1) for k, h in enumerate(hs)]
    want = F.log_softmax(torch.stack(logps).mean(0), -1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # the stages really disagree, so the combination is not trivially any one of them
    assert (logps[0] - logps[3]).abs().max() > 0.5


def test_forward_with_entropy_weighting(random_model, rebuild_model, token_batch):
    model = rebuild_model(random_model(seed=3, dtype=torch.float64), poe_alpha=1.0)
    idx = token_batch(1, 20, seed=3)
    with torch.no_grad():
        out = model(idx)
        hs = reference_trunk(model, idx)
    logps = torch.stack([F.log_softmax(reference_logits(model, h, k), -1) for k, h in enumerate(hs)])
    ent = -(logps.exp() * logps).sum(-1, keepdim=True)                   # (K, B, T, 1)
    w = torch.exp(-1.0 * ent) / torch.exp(-1.0 * ent).sum(0, keepdim=True)
    want = F.log_softmax((w * logps).sum(0), -1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    plain = F.log_softmax(logps.mean(0), -1)
    assert (want - plain).abs().max() > 1e-3


def test_stage_logits_is_shared_plus_stage_head(random_model):
    model = random_model(seed=4)
    h = F.rms_norm(torch.randn(3, 5, 64), (64,))
    with torch.no_grad():
        for k in range(4):
            z = model.lm_head(h) + model.lm_head_stages[k](h)
            torch.testing.assert_close(model.stage_logits(h, k), 15 * torch.tanh(z / 15))
        torch.testing.assert_close(model.shared_logits(h), 15 * torch.tanh(model.lm_head(h) / 15))
        z0, z1 = model.stage_logits(h, 0), model.stage_logits(h, 1)
    assert z0.dtype == torch.float32 and z0.abs().max() <= 15
    assert not torch.allclose(z0, z1)


def test_softcap_bounds_logits(random_model):
    model = random_model(seed=4)
    h = 100 * F.rms_norm(torch.randn(2, 64), (64,))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
        z = model.stage_logits(h, 0)
    assert z.abs().max() <= 15.0
    assert z.abs().max() > 14.0


def test_vocab_is_padded_to_64_and_logits_cropped(random_model, token_batch):
    cfg = PoEConfig.from_preset("tiny", vocab_size=500)
    assert cfg.padded_vocab_size == 512
    model = random_model(cfg, seed=5)
    assert model.wte.weight.shape[0] == 512 and model.lm_head.weight.shape[0] == 512
    idx = token_batch(1, 10, seed=5, vocab=500)
    with torch.no_grad():
        out = model(idx)
        lps = model.stage_logprobs(idx)
    assert out.shape[-1] == 500 and all(lp.shape[-1] == 500 for lp in lps)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(1, 10))


def test_stage_logprobs_and_forward_stage(random_model, token_batch):
    model = random_model(seed=6)
    idx = token_batch(2, 20, seed=6)
    calls = [0] * 8
    handles = [b.register_forward_hook(lambda m, i, o, j=j: calls.__setitem__(j, calls[j] + 1))
               for j, b in enumerate(model.blocks)]
    try:
        lps = model.stage_logprobs(idx)
        assert calls == [1] * 8
        assert len(lps) == 4
        for k, b in enumerate(model.config.boundaries):
            calls[:] = [0] * 8
            z = model.forward_stage(idx, k)
            assert calls == [1] * (b + 1) + [0] * (7 - b), (k, calls)
            assert z.shape == (2, 20, 512)
            torch.testing.assert_close(F.log_softmax(z, -1), lps[k])
        calls[:] = [0] * 8
        first2 = model.stage_logprobs(idx, n_stages=2)
        assert calls == [1] * 6 + [0] * 2 and len(first2) == 2
        torch.testing.assert_close(first2[1], lps[1])
    finally:
        for hd in handles:
            hd.remove()
    for bad in (-1, 4, 1.0, "0"):
        with pytest.raises(PoEError, match="stage"):
            model.forward_stage(idx, bad)


def test_forward_matches_logop_of_stage_logprobs(random_model, token_batch):
    model = random_model(seed=7)
    idx = token_batch(2, 16, seed=7)
    with torch.no_grad():
        out = model(idx)
    lps = model.stage_logprobs(idx)
    torch.testing.assert_close(out, F.log_softmax(torch.stack(lps).mean(0), -1), rtol=1e-5, atol=1e-5)


# --- context -----------------------------------------------------------------------------------
# (the KV cache and its contract: tests/test_cache.py)

def test_a_sequence_past_the_context_raises(random_model, token_batch):
    model = random_model(seed=8)
    with pytest.raises(PoEError, match="context"):
        model.trunk(token_batch(1, 65))


# --- windows, value embeddings, backout, causality -----------------------------------------------

def test_attention_mask():
    assert attention_mask(0, 6, 6, 5, "cpu") is None
    assert attention_mask(0, 6, 6, 100, "cpu") is None
    m = attention_mask(0, 6, 6, 2, "cpu")
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    m = attention_mask(10, 1, 11, 3, "cpu")          # one decoding query at position 10
    assert m.shape == (1, 11)
    assert m[0].nonzero().flatten().tolist() == [7, 8, 9, 10]
    m = attention_mask(4, 2, 6, 100, "cpu")          # a chunk after a prefix: causal within it
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool))


def one_layer(model, idx, layer):
    """Output of layer `layer` applied straight to the embedding (x = x0 = embed(idx))."""
    x = model.embed(idx)
    return model.run_layers(TrunkState(x, x), idx, layer, layer + 1).x


def test_sliding_window_limits_what_a_query_sees(random_model, token_batch):
    model = random_model(seed=9)
    cfg = model.config
    assert cfg.windows[0] == 16 and cfg.windows[7] == 64
    idx = token_batch(1, 60, seed=9)
    idx2 = idx.clone()
    idx2[0, 5] = (idx[0, 5] + 1) % 512
    with torch.no_grad():
        short_a, short_b = one_layer(model, idx, 0), one_layer(model, idx2, 0)
        long_a, long_b = one_layer(model, idx, 7), one_layer(model, idx2, 7)
    # token 5 reaches positions 5 and 6 through the embedding (smear), and a window of 16 keys on
    # from there: queries 5..22 change, query 23 onwards cannot see it in a short-window layer
    changed = (short_a - short_b).abs().amax(-1)[0] > 0
    assert changed[5:23].all()
    assert not changed[23:].any()
    assert not changed[:5].any()
    torch.testing.assert_close(short_a[:, 23:], short_b[:, 23:], rtol=0, atol=0)
    # a full-attention layer still sees it at the far end
    assert ((long_a - long_b).abs().amax(-1)[0, 23:] > 1e-6).all()


def test_value_embeddings_on_alternating_layers(random_model):
    for L, layout in ((8, (4, 2, 1, 1)), (7, (3, 2, 1, 1))):
        cfg = PoEConfig.from_preset("tiny", n_layer=L, stage_layout=layout)
        model = PoEGPT(cfg)
        want = [i for i in range(L) if i % 2 == (L - 1) % 2]
        assert sorted(int(k) for k in model.value_embeds) == want
        assert [i for i, b in enumerate(model.blocks) if b.attn.ve_gate is not None] == want
        assert (L - 1) in want
        assert model.value_embeds[str(L - 1)].weight.shape == (512, cfg.n_kv_head * cfg.head_dim)
    assert len(PoEGPT(PoEConfig.from_preset("tiny", value_embeds=False)).value_embeds) == 0


def test_value_embedding_changes_only_its_layer_onwards(random_model, token_batch):
    model = random_model(seed=10)
    idx = token_batch(1, 12, seed=10)
    with torch.no_grad():
        a = model.stage_logprobs(idx)
        model.value_embeds["5"].weight.add_(0.5)
        b = model.stage_logprobs(idx)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)        # layers 0..3
    assert not torch.allclose(a[1], b[1])                         # layer 5 is in stage 1


def test_backout_only_past_the_middle(random_model, token_batch):
    model = random_model(seed=11)
    assert model.config.backout_layer == 4 and model.config.boundaries[0] < 4
    idx = token_batch(2, 20, seed=11)
    with torch.no_grad():
        a = model.stage_logprobs(idx)
        model.backout_lambda.add_(0.3)
        b = model.stage_logprobs(idx)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for k in (1, 2, 3):
        assert (a[k] - b[k]).abs().max() > 1e-4, k


def test_causality(random_model, token_batch):
    model = random_model(seed=12)
    idx = token_batch(2, 50, seed=12)
    idx2 = idx.clone()
    idx2[:, 30] = (idx[:, 30] + 7) % 512
    with torch.no_grad():
        a, b = model.stage_logprobs(idx), model.stage_logprobs(idx2)
        fa, fb = model(idx), model(idx2)
    for k in range(4):
        torch.testing.assert_close(a[k][:, :30], b[k][:, :30], rtol=0, atol=0)
        assert (a[k][:, 30:] - b[k][:, 30:]).abs().amax(-1).min() > 0      # every later position moves
    torch.testing.assert_close(fa[:, :30], fb[:, :30], rtol=0, atol=0)
    assert not torch.allclose(fa[:, 30], fb[:, 30])


# --- generation --------------------------------------------------------------------------------

def test_greedy_generate_equals_rerunning_the_full_forward(random_model, token_batch):
    model = random_model(seed=13)
    prompt = token_batch(2, 5, seed=13)
    out = model.generate(prompt, max_new_tokens=25)
    assert out.shape == (2, 30)
    assert torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(25):
            nxt = model(seq)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)
    assert len(set(out[0, 5:].tolist())) > 1          # not a degenerate constant stream
    assert torch.equal(model.generate(prompt, max_new_tokens=0), prompt)


def test_sampling_is_seeded(random_model, token_batch):
    model = random_model(seed=14)
    prompt = token_batch(2, 4, seed=14)
    a = model.generate(prompt, 20, do_sample=True, seed=1)
    b = model.generate(prompt, 20, do_sample=True, seed=1)
    c = model.generate(prompt, 20, do_sample=True, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = model.generate(prompt, 20)
    assert torch.equal(model.generate(prompt, 20, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(model.generate(prompt, 20, do_sample=True, temperature=0.0, seed=3), greedy)
    assert torch.equal(model.generate(prompt, 20, do_sample=True, top_p=1e-6, seed=3), greedy)


def test_generate_eos_rows_stay_finished(random_model, token_batch):
    model = random_model(seed=15)
    prompt = token_batch(2, 4, seed=15)
    free = model.generate(prompt, 12)
    eos = int(free[0, 6])                              # row 0's third new token
    first = (free[0, 4:] == eos).nonzero()[0].item() + 4
    out = model.generate(prompt, 12, eos_token_id=eos)
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == eos).all()
    if out.size(1) < free.size(1):                     # stopped early: every row hit eos
        assert (out[:, -1] == eos).all()


@pytest.mark.parametrize("kw, match", [
    (dict(ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(max_new_tokens=61), "context"),
    (dict(temperature=-0.5, do_sample=True), "temperature"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_k=0, do_sample=True), "top_k"),
    (dict(ids=torch.tensor([[1, 512]])), "token ids"),
    (dict(ids=torch.tensor([[1, -1]])), "token ids"),
    (dict(ids=torch.zeros(1, 2, 3, dtype=torch.long)), "ids"),
    (dict(ids=torch.tensor([[1.0, 2.0]])), "ids"),
])
def test_bad_generate_inputs(kw, match, random_model):
    model = random_model(seed=16)
    kw = {"ids": torch.tensor([[1, 2, 3, 4]]), "max_new_tokens": 4, **kw}
    ids = kw.pop("ids")
    with pytest.raises(PoEError, match=match):
        model.generate(ids, **kw)


def test_generate_fills_the_whole_context(random_model):
    model = random_model(seed=16)
    out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=60)
    assert out.shape == (1, 64)


# --- accounting --------------------------------------------------------------------------------

def expected_flops(cfg, m, T, training=False, heads=None):
    d, H, G, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    n_layers = cfg.boundaries[m - 1] + 1
    params = 0
    for i in range(n_layers):
        params += d * H * D + 2 * d * G * D + H * D * d + 2 * d * 4 * d      # q, k, v, proj, fc, proj
        params += 12 * G if cfg.has_value_embed(i) else 0                    # ve_gate
    params += 24                                                             # smear_gate
    params += (m if heads is None else heads) * cfg.padded_vocab_size * d
    attn = 0.0
    for i in range(n_layers):
        w = cfg.windows[i]
        if training:   # average over the T positions of one sequence of keys min(t+1, w+1)
            keys = sum(min(t + 1, w + 1) for t in range(T)) / T
        else:          # one query whose context holds T tokens
            keys = min(T, w + 1)
        attn += 4 * H * D * keys                                             # QK^T and AV
    fwd = 2 * params + attn
    return 3 * fwd if training else fwd


def test_flops_per_token_tiny(tiny_cfg):
    model = PoEGPT(tiny_cfg)
    per_stage = [model.flops_per_token(n_stages=m, context=40) for m in range(1, 5)]
    assert all(a < b for a, b in zip(per_stage, per_stage[1:]))
    for m in range(1, 5):
        assert per_stage[m - 1] == pytest.approx(expected_flops(tiny_cfg, m, 40), abs=1)
    assert model.flops_per_token() == pytest.approx(expected_flops(tiny_cfg, 4, 64), abs=1)
    assert model.flops_per_token(context=64) == model.flops_per_token()
    for T in (5, 17, 40, 64):
        assert model.flops_per_token(context=T, training=True) == \
            pytest.approx(expected_flops(tiny_cfg, 4, T, training=True), abs=2)
    assert model.train_flops_per_token() == pytest.approx(expected_flops(tiny_cfg, 4, 64, training=True), abs=2)
    final_only = PoEGPT(tiny_cfg.replace(objective="final_only"))
    assert final_only.train_flops_per_token() == \
        pytest.approx(expected_flops(tiny_cfg, 4, 64, training=True, heads=1), abs=2)
    assert final_only.train_flops_per_token() < model.train_flops_per_token()


def test_flops_per_token_1_5b(meta_1_5b):
    cfg = meta_1_5b.config
    for m in range(1, 5):
        assert meta_1_5b.flops_per_token(n_stages=m, context=2048) == \
            pytest.approx(expected_flops(cfg, m, 2048), abs=1)
    # decoding the full 1.5B model: 2 x (block matrices + one summed-weight head per stage) plus
    # attention, i.e. a little over 2 x the parameters that are neither embeddings nor W_s
    matmul = CARD_PARAMS - 73_728_000 - 442_368_000 - 73_728_000
    assert 2 * matmul < meta_1_5b.flops_per_token() < 2.2 * matmul


def test_kv_bytes_per_token(tiny_cfg, meta_1_5b):
    model = PoEGPT(tiny_cfg)
    assert model.kv_bytes_per_token() == 8 * 2 * 2 * 16 * 2
    assert model.kv_bytes_per_token(torch.float32) == 8 * 2 * 2 * 16 * 4
    assert [model.kv_bytes_per_token(n_stages=m) for m in range(1, 5)] == [4 * 128, 6 * 128, 7 * 128, 8 * 128]
    assert meta_1_5b.kv_bytes_per_token() == 24 * 2 * 6 * 128 * 2
    assert meta_1_5b.kv_bytes_per_token(n_stages=1) == 12 * 2 * 6 * 128 * 2
    # and it is what the cache really holds per token
    cache = KVCache(tiny_cfg, 1, 10, dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert held == 10 * model.kv_bytes_per_token()


def test_init_weights_is_the_documented_scheme(tiny_cfg):
    model = PoEGPT(tiny_cfg)
    model.init_weights(seed=0)
    assert all((h.weight == 0).all() for h in model.lm_head_stages)
    assert all((b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all() for b in model.blocks)
    torch.testing.assert_close(model.resid_lambdas[[0, -1]], torch.tensor([1.15, 1.05]))
    torch.testing.assert_close(model.x0_lambdas[[0, -1]], torch.tensor([0.20, 0.05]))
    assert model.smear_lambda.item() == 0.0
    assert model.backout_lambda.item() == pytest.approx(0.2)
    a = PoEGPT(tiny_cfg)
    a.init_weights(seed=3)
    b = PoEGPT(tiny_cfg)
    b.init_weights(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    # fresh: every stage is the shared head, so all stages agree
    idx = torch.randint(0, 512, (1, 8))
    lps = a.stage_logprobs(idx)
    torch.testing.assert_close(a.stage_logits(torch.ones(64), 2), a.shared_logits(torch.ones(64)))
    assert torch.isfinite(lps[0]).all()


def test_ragged_batch_rows_generate_as_if_alone(random_model, token_batch):
    """Per-row cache positions: a short and a long prompt in one batch decode exactly as alone."""
    model = random_model(seed=17)
    a = token_batch(1, 5, seed=17)[0].tolist()
    b = token_batch(1, 23, seed=18)[0].tolist()           # longer than the short window after decoding
    both = model.generate([a, b], max_new_tokens=12)
    alone_a = model.generate(torch.tensor([a]), max_new_tokens=12)[0]
    alone_b = model.generate(torch.tensor([b]), max_new_tokens=12)[0]
    assert both[0, :17].tolist() == alone_a.tolist()
    assert both[1].tolist() == alone_b.tolist()
