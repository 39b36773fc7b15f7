"""The mode table: one self-validating entry per mode, read by the CLI, the server and the scheduler.

`tail_mode` is a mode defined here only (as a new mode's own module would) and registered in the
table; nothing else in the package is told about it, yet the CLI and the server serve it."""

import httpx
import pytest
import torch

from poegpt import PoEConfig
from poegpt.cli import build_parser, main
from poegpt.engine import StageMix
from poegpt.errors import PoEError
from poegpt.modes import MODES, Field, Mode, ModeSpec, merge_reports, register, run_mode, static_report, static_steps
from poegpt.serving import create_app
from poegpt.tokenizer import Tokenizer

from conftest import build_random_model
from test_server import serving


def _tail_check(spec, model):
    K = model.config.n_stages
    if isinstance(spec.depth, bool) or not isinstance(spec.depth, int) or not 1 <= spec.depth <= K:
        raise PoEError(f"depth must be an integer in 1..{K}, got {spec.depth!r}")


@pytest.fixture
def tail_mode():
    """Log-OP of the deepest `depth` stages: a new static mode, added to the table and nowhere else."""
    mode = register(Mode(
        "tail", "Log-OP of the deepest stages", static_steps, static_report,
        lambda cfg, cal: [("tail 2", {"depth": 2})],
        (Field("depth", "int", "how many of the deepest stages", required=True),),
        check=_tail_check,
        mix=lambda spec, cfg: StageMix.composition(cfg.n_stages, list(range(cfg.n_stages - spec.depth, cfg.n_stages)))))
    yield mode
    MODES.pop("tail")


def test_a_new_mode_appears_in_the_cli(tail_mode, capsys):
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "tail" in generate._option_string_actions["--mode"].choices
    assert "tail: how many of the deepest stages" in generate._option_string_actions["--depth"].help
    args = build_parser().parse_args(["generate", "--mode", "tail", "--depth", "2", "--prompt", "x"])
    assert (args.mode, args.depth) == ("tail", 2)
    # and it runs: the shipped demo model, compared with the composition it means
    assert main(["generate", "--mode", "tail", "--depth", "2", "--max-new-tokens", "6", "--dtype", "fp32",
                 "--prompt", "The capital of France is"]) == 0
    out, err = capsys.readouterr()
    assert "[tail: 6 tokens" in err
    from poegpt.checkpoint import load_model
    model, tok = load_model("demo")
    K = model.config.n_stages
    ids = tok.encode("The capital of France is")
    want = model.generate_parallel_composition([ids], stages=[K - 2, K - 1], max_new_tokens=6, eos_token_id=tok.bos_id)
    assert out == "The capital of France is" + tok.decode(want[0, len(ids):].tolist()) + "\n"
    assert main(["generate", "--mode", "tail", "--depth", "9", "--prompt", "x"]) == 2
    assert "--depth must be an integer in 1..4, got 9" in capsys.readouterr().err


def test_a_new_mode_appears_in_the_server(tail_mode):
    tok = Tokenizer.train(["the mode table serves every mode " * 4, "una tabla de modos para todos"], 300)
    model = build_random_model(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size), seed=5)
    with serving(create_app(model, tok, "m", max_batch=2, timeout=60)) as url, httpx.Client(base_url=url) as http:
        card = http.get("/v1/models/m").json()["poe"]
        assert "tail" in card["modes"] and "tail" in card["batched_modes"]
        r = http.post("/v1/completions", json={"model": "m", "prompt": "the mode", "max_tokens": 5, "temperature": 0,
                                               "poe_mode": "tail", "depth": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        ids = tok.encode("the mode")
        want = model.generate_parallel_composition([ids], stages=[2, 3], max_new_tokens=5, eos_token_id=tok.bos_id)
        assert body["choices"][0]["text"] == tok.decode(want[0, len(ids):].tolist())
        assert body["poe"]["mode"] == "tail" and body["poe"]["stages"] == [2, 3]
        for fields, param in (({"poe_mode": "tail"}, "poe_mode"), ({"poe_mode": "tail", "depth": 7}, "depth"),
                              ({"depth": 2}, "depth")):
            r = http.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2, **fields})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_mode_spec_checks_itself(tiny_cfg):
    assert ModeSpec("prefix", max_stages=2) == ModeSpec("prefix", max_stages=2)
    assert len({ModeSpec("prefix", max_stages=2), ModeSpec("prefix", max_stages=2), ModeSpec("full")}) == 2
    assert ModeSpec("speculative", k_draft="4").k_draft == 4          # the CLI's strings
    assert ModeSpec("speculative").verifier == "poe" and ModeSpec("speculative", verifier="dense").verifier == "dense"
    assert ModeSpec("wand", p99_bounds=[1, float("inf")]).p99_bounds == (1.0, float("inf"))
    for mode, kw, message in [("nope", {}, "unknown mode 'nope'"),
                              ("full", {"stage": 1}, "stage applies to mode 'stage' only"),
                              ("full", {"colour": 1}, "unknown mode field 'colour'"),
                              ("prefix", {}, "prefix mode needs max_stages"),
                              ("wand", {"safety": float("nan")}, "safety must be a finite number"),
                              ("composition", {"stages": 3}, "stages must be a list of integers"),
                              ("composition", {"stages": [0], "stage_weights": [1, "x"]}, "stage_weights must be a list"),
                              ("speculative", {"verifier": "full"}, "verifier must be one of poe, dense, got 'full'"),
                              ("speculative", {"verifier": 1}, "verifier must be one of poe, dense, got 1")]:
        with pytest.raises(PoEError, match=message):
            ModeSpec(mode, **kw)
    model = build_random_model(tiny_cfg, seed=1)
    for spec, message in [(ModeSpec("prefix", max_stages=5), "max_stages must be an integer in 1..4"),
                          (ModeSpec("speculative", draft_stage=3), "draft_stage must be an integer in 0..2"),
                          (ModeSpec("wand"), "WAND needs p99 bounds")]:
        with pytest.raises(PoEError, match=message):
            spec.check(model)
    with pytest.raises(AttributeError):
        ModeSpec("full").mode = "prefix"


def test_every_mode_runs_from_its_table_entry(tiny_cfg):
    """Each entry's showcase settings run, report, and merge; greedy-only modes refuse sampling."""
    model = build_random_model(tiny_cfg, seed=2)
    rows = [[1, 5, 9], [2, 7]]
    for name, mode in MODES.items():
        for label, fields in mode.examples(model.config, model.calibration):
            spec = ModeSpec(name, **fields)
            gen = run_mode(model, rows, spec, 4)
            assert [len(t) for t in gen.tokens] == [4, 4], label
            report = mode.report(spec, gen, model.config, 4)
            assert report["mode"] == name and report["tokens"] == 4
            merged = merge_reports([report, report])
            assert merged["tokens"] == 8 and merged["mode"] == name
    from poegpt.engine import Sampling
    with pytest.raises(PoEError, match="WAND mode is greedy"):
        run_mode(model, rows, ModeSpec("wand", p99_bounds=(1.0,) * 3), 4, Sampling(do_sample=True))
    full = run_mode(model, rows, ModeSpec("full"), 4).tokens
    assert full == [model.generate([r], max_new_tokens=4)[0, len(r):].tolist() for r in rows]


def test_choice_fields_need_their_choices():
    for field in (Field("colour", "choice", "a colour"), Field("n", "int", "a count", choices=("a",))):
        with pytest.raises(PoEError, match="needs choices exactly when its kind is 'choice'"):
            register(Mode("bad", "x", static_steps, static_report, lambda cfg, cal: [], (field,)))
    assert "bad" not in MODES


def test_the_dense_verifier_in_the_cli(capsys):
    """--verifier comes from the table: dense-verified speculative decoding prints stage K-1's greedy text."""
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "speculative: what verifies" in generate._option_string_actions["--verifier"].help
    prompt = "The capital of France is"
    assert main(["generate", "--mode", "speculative", "--verifier", "dense", "--draft-stage", "1", "--fallback", "never",
                 "--max-new-tokens", "8", "--dtype", "fp32", "--prompt", prompt]) == 0
    out, err = capsys.readouterr()
    assert "[speculative: 8 tokens" in err and "acceptance" in err
    from poegpt.checkpoint import load_model
    model, tok = load_model("demo")
    ids = tok.encode(prompt)
    want = model.generate_stage([ids], model.config.n_stages - 1, max_new_tokens=8, eos_token_id=tok.bos_id)
    assert out == prompt + tok.decode(want[0, len(ids):].tolist()) + "\n"
    assert main(["generate", "--mode", "speculative", "--verifier", "nope", "--prompt", "x"]) == 2
    assert "--verifier must be one of poe, dense, got 'nope'" in capsys.readouterr().err


def test_the_dense_verifier_in_the_server():
    """The server takes "verifier" from the table; the tokens and their log-probs are stage K-1's."""
    tok = Tokenizer.train(["the dense verifier serves the last stage " * 4, "una tabla de modos"], 300)
    model = build_random_model(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size), seed=6)
    K = model.config.n_stages
    with serving(create_app(model, tok, "m", max_batch=2, timeout=60)) as url, httpx.Client(base_url=url) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": "the dense", "max_tokens": 5, "temperature": 0,
                                               "logprobs": 1, "poe_mode": "speculative", "verifier": "dense",
                                               "draft_stage": 1, "return_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        ids = tok.encode("the dense")
        new = model.generate_stage([ids], K - 1, max_new_tokens=5, eos_token_id=tok.bos_id)[0, len(ids):].tolist()
        assert body["choices"][0]["token_ids"] == new[:len(body["choices"][0]["token_ids"])]
        assert body["poe"]["verifier"] == "dense"
        with torch.no_grad():
            dense = torch.log_softmax(model.forward_stage(torch.tensor([ids + new]), K - 1)[0], -1)
        got = body["choices"][0]["token_ids"]
        assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            [float(dense[len(ids) - 1 + i, t]) for i, t in enumerate(got)], abs=1e-4)
        r = http.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2,
                                               "poe_mode": "speculative", "verifier": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "verifier", r.text
