"""The OpenAI-compatible server: every request field, each PoE mode equal to its model method, batched
requests equal to the same request alone, SSE (Korean and emoji text), queue limit, disconnects,
timeouts, metrics, errors, and the `poegpt serve` command. Real uvicorn servers on loopback ports,
the official openai client for completions and streaming."""

import contextlib
import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poegpt import PoEConfig, PoEGPT
from poegpt.errors import PoEError
from poegpt.logop import logop
from poegpt.serving import LoadingApp, create_app
from poegpt.tokenizer import Tokenizer

from conftest import build_random_model

NAME = "tiny-poe"
SENTENCES = ["The quick brown fox jumps over the lazy dog. It's 2024!",
             "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요.", "我们今天学习机器学习。",
             "Emoji time 😀😃🎉🚀👍🏽 ❤️ 🇰🇷", "def forward(self, x):\n    return x + 1\n"]
SCRIPT = "한국어 말🙂ok"        # 19 bytes, all different: a byte-level chain the scripted model follows
K = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process servers' engines run with one torch thread: a tiny model gains nothing from more,
    and on a machine whose cores are busy with other work, spinning OpenMP threads make it ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([" ".join(SENTENCES[(i + j) % 5] for j in range(3)) for i in range(12)], 320)


@pytest.fixture(scope="module")
def model(tok):
    return build_random_model(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size), seed=3)


@contextlib.contextmanager
def serving(app):
    """Run `app` under uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)   # TCP_NODELAY, as serve's
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, NAME, max_batch=4, max_queue=32, timeout=60)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(http, **body):
    r = http.post("/v1/completions", json={"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def alone(model, tok, ids, n, mode="full", **kw):
    """The same request through the model's own method, batch 1: the new token ids."""
    eos = tok.bos_id
    call = {"full": lambda: model.generate([ids], max_new_tokens=n, eos_token_id=eos, **kw),
            "prefix": lambda: model.generate_prefix([ids], max_new_tokens=n, eos_token_id=eos, **kw),
            "stage": lambda: model.generate_stage([ids], max_new_tokens=n, eos_token_id=eos, **kw),
            "composition": lambda: model.generate_parallel_composition([ids], max_new_tokens=n, eos_token_id=eos, **kw),
            "wand": lambda: model.generate_wand([ids], max_new_tokens=n, eos_token_id=eos, **kw),
            "speculative": lambda: model.generate_speculative([ids], max_new_tokens=n, eos_token_id=eos, **kw)}
    return call[mode]()[0, len(ids):].tolist()


def sse_events(body: str) -> list[dict]:
    data = [line[len("data: "):] for line in body.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and body.endswith("data: [DONE]\n\n")
    return [json.loads(d) for d in data[:-1]]


def metric_sum(text: str, name: str) -> float:
    """The sum of a metric family's samples over all its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def metric(text: str, name: str, **labels) -> float:
    want = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- the completions API ---------------------------------------------------------------------------

def test_models_and_health(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    card = http.get(f"/v1/models/{NAME}").json()
    assert card["max_model_len"] == 64 and card["poe"]["n_stages"] == K
    assert http.get("/health").json()["status"] == "ok"


def test_greedy_completion_with_openai_client_equals_generate(client, model, tok):
    prompt = "안녕하세요 world"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, user="tester",
                                  extra_body={"return_token_ids": True})
    want = alone(model, tok, tok.encode(prompt), 12)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == want
    assert choice.text == tok.decode(want, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if tok.bos_id in want else "length")
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(want)
    assert r.model_extra["poe"]["mode"] == "full" and choice.model_extra["poe"]["layers_per_token"] == 8
    # token-id prompts (one, or several) are taken as given: no <|bos|> is added
    ids = [[tok.bos_id, 5, 77, 200], [tok.bos_id, 9]]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.model_extra["token_ids"] for c in r.choices] == [alone(model, tok, p, 6) for p in ids]
    assert r.usage.prompt_tokens == 6


MODES = [
    ("full", {}, {}),
    ("prefix", {"max_stages": 2}, {"max_stages": 2}),
    ("stage", {"stage": 1}, {"stage": 1}),
    ("composition", {"stages": [0, 2, 3], "stage_weights": [0.5, 1, 1]}, {"stages": [0, 2, 3], "stage_weights": [0.5, 1, 1]}),
    ("wand", {"p99_bounds": [0.5, 0.5, 0.5], "safety": 1.0}, {"p99_bounds": [0.5, 0.5, 0.5], "safety": 1.0}),
    ("speculative", {"draft_stage": 1, "k_draft": 3, "fallback": "never"},
     {"draft_stage": 1, "k_draft": 3, "fallback": "never"}),
]


@pytest.mark.parametrize("mode, fields, kw", MODES, ids=[m[0] for m in MODES])
def test_each_poe_mode_equals_its_model_method(http, model, tok, mode, fields, kw):
    ids = tok.encode("The quick brown")
    body = complete(http, prompt=ids, max_tokens=14, temperature=0, poe_mode=mode, return_token_ids=True, **fields)
    got, poe = body["choices"][0]["token_ids"], body["choices"][0]["poe"]
    assert got == alone(model, tok, ids, 14, mode, **kw)
    assert poe["mode"] == mode == body["poe"]["mode"] and poe["tokens"] == len(got)
    b = model.config.boundaries
    if mode in ("full", "prefix", "stage", "composition"):
        assert poe["layers_per_token"] == {"full": 8, "prefix": b[1] + 1, "stage": b[1] + 1, "composition": 8}[mode]
    if mode == "composition":
        assert poe["stages"] == [0, 2, 3] and poe["stage_weights"] == pytest.approx([0.2, 0.4, 0.4])
    if mode == "wand":
        _, used = model.generate_wand([ids], max_new_tokens=14, eos_token_id=tok.bos_id, return_stages_used=True, **kw)
        assert poe["stages_used"] == used[0] and min(used[0]) < K - 1          # some tokens exit early
        assert poe["mean_layers_per_token"] == pytest.approx(sum(b[s] + 1 for s in used[0]) / len(used[0]))
    if mode == "speculative":
        assert got == alone(model, tok, ids, 14)                              # == full greedy
        assert 0 <= poe["acceptance_rate"] <= 1 and poe["tokens_per_pass"] >= 1 and poe["drafted"] > 0


def test_concurrent_requests_each_equal_the_request_alone(server, model, tok):
    """Ten requests from threads, staggered so that they join a running batch at different positions;
    more than max_batch (4), so some wait in the queue. Each equals the same request alone."""
    url, app = server
    jobs = [("full", {}, {}), ("prefix", {"max_stages": 1}, {"max_stages": 1}), ("stage", {"stage": 2}, {"stage": 2}),
            ("composition", {"stages": [1, 3]}, {"stages": [1, 3]}), ("full", {}, {}),
            ("speculative", {"draft_stage": 0, "k_draft": 2}, {"draft_stage": 0, "k_draft": 2}),
            ("wand", {"p99_bounds": [1.0, 1.0, 1.0]}, {"p99_bounds": [1.0, 1.0, 1.0]}),
            ("prefix", {"max_stages": 3}, {"max_stages": 3}), ("full", {"temperature": 0.9, "seed": 5, "top_k": 40},
                                                              {"do_sample": True, "temperature": 0.9, "seed": 5, "top_k": 40}),
            ("stage", {"stage": 0}, {"stage": 0})]
    prompts = [tok.encode(SENTENCES[i % 5][: 6 + 3 * i]) for i in range(len(jobs))]
    before = app.state.metrics.render()
    results = [None] * len(jobs)

    def run(i):
        time.sleep(0.01 * i)
        mode, fields, _ = jobs[i]
        body = {"model": NAME, "prompt": prompts[i], "max_tokens": 20, "return_token_ids": True, "poe_mode": mode,
                "temperature": 0, **fields}
        with httpx.Client(timeout=60) as c:
            results[i] = c.post(url + "/v1/completions", json=body).json()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    slow = model.blocks[0].register_forward_pre_hook(lambda m, a: time.sleep(0.002))   # so that requests overlap
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        slow.remove()
    for i, (mode, _, kw) in enumerate(jobs):
        assert results[i]["choices"][0]["token_ids"] == alone(model, tok, prompts[i], 20, mode, **kw), (i, mode)
    after = app.state.metrics.render()
    steps = metric(after, "poegpt_decode_batch_size_count") - metric(before, "poegpt_decode_batch_size_count")
    single = metric(after, "poegpt_decode_batch_size_bucket", le="1") - metric(before, "poegpt_decode_batch_size_bucket", le="1")
    assert steps > single, "no decode step ran more than one row"


def test_speculative_drafts_alone_and_decodes_in_the_batch_under_load(model, tok):
    """One engine, stepped by hand: a speculative request runs draft-verify cycles while it is the only
    row, then plain steps of full PoE once a WAND and a seeded sampled request join the batch. Every
    output equals the request alone (speculative: full greedy), and each mode reports what it did."""
    from poegpt.modes import ModeSpec
    from poegpt.serving.scheduler import Scheduler
    from poegpt.serving.sequence import SeqParams, Sequence
    from poegpt.engine import Sampling
    sch = Scheduler(model, tok, max_batch=4)
    ids = [tok.encode(SENTENCES[i][:24]) for i in range(3)]
    spec = Sequence(SeqParams(tuple(ids[0]), 24, ModeSpec("speculative", draft_stage=0, k_draft=2, fallback="never")))
    wand = Sequence(SeqParams(tuple(ids[1]), 12, ModeSpec("wand", p99_bounds=(0.5, 0.5, 0.5))))
    sampled = Sequence(SeqParams(tuple(ids[2]), 12, ModeSpec("speculative"), Sampling(True, 0.9, 40, None, 7)))

    def step(*seqs):
        sch.submit(list(seqs)) if seqs else None
        admitted, _ = sch._admit()
        sch._step(admitted)

    step(spec)
    step()
    step()
    assert spec.gen.drafted > 0 and spec.gen.extra["plain_steps"] == 0          # alone: it speculates
    step(wand, sampled)
    while any(s.state != "done" for s in (spec, wand, sampled)):
        step()
    eos = tok.bos_id
    assert spec.tokens == model.generate([ids[0]], max_new_tokens=24, eos_token_id=eos)[0, len(ids[0]):].tolist()
    assert spec.gen.extra["plain_steps"] > 0                                      # under load: plain batched steps
    report = sch.poe_info(spec)
    assert report["plain_steps"] == spec.gen.extra["plain_steps"] and report["drafted"] == spec.gen.drafted > 0
    out, used = model.generate_wand([ids[1]], max_new_tokens=12, eos_token_id=eos, p99_bounds=[0.5] * 3,
                                    return_stages_used=True)
    assert wand.tokens == out[0, len(ids[1]):].tolist() and sch.poe_info(wand)["stages_used"] == used[0]
    assert min(used[0]) < model.config.n_stages - 1                              # some tokens exit early
    full = model.generate([ids[2]], max_new_tokens=12, eos_token_id=eos, do_sample=True, temperature=0.9, top_k=40,
                          seed=7)
    # a seeded sampled speculative row decodes plainly, whatever the load: it is full PoE's seeded sample
    assert sampled.tokens == full[0, len(ids[2]):].tolist() and sampled.gen.drafted == 0


def test_seeded_sampling_n_choices_top_k_top_p(http, model, tok):
    ids = tok.encode("Emoji time")
    body = dict(prompt=ids, max_tokens=10, temperature=0.8, top_k=30, top_p=0.9, seed=11, n=3, return_token_ids=True)
    a, b = complete(http, **body), complete(http, **body)
    got = [c["token_ids"] for c in a["choices"]]
    assert got == [c["token_ids"] for c in b["choices"]]               # reproducible
    for j in range(3):                                                  # choice j is seeded seed + j
        assert got[j] == alone(model, tok, ids, 10, do_sample=True, temperature=0.8, top_k=30, top_p=0.9, seed=11 + j)
    assert len({tuple(g) for g in got}) > 1
    assert a["usage"]["prompt_tokens"] == len(ids) and a["usage"]["completion_tokens"] == sum(map(len, got))


def test_streaming_with_openai_client_matches_non_streaming(client, http):
    kw = dict(model=NAME, prompt=["def forward(self", "The quick"], max_tokens=10, temperature=0, n=2)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finish = {}, {}
    for ch in chunks[:-1]:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[c.index] for c in whole.choices] == [c.text for c in whole.choices]
    assert [finish[c.index] for c in whole.choices] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = http.post("/v1/completions", json={**kw, "stream": True}).text
    events = sse_events(raw)
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events)


@pytest.mark.parametrize("mode, fields", [("speculative", {}), ("wand", {"p99_bounds": [1.0] * 3})])
def test_zero_max_tokens_in_solo_modes(http, mode, fields):
    """max_tokens 0 in WAND / speculative mode (no step ever runs; the fuzz found its 500)."""
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "The", "max_tokens": 0, "poe_mode": mode,
                                               "temperature": 0, "stream": stream, **fields})
        assert r.status_code == 200, r.text
        last = sse_events(r.text)[-1] if stream else r.json()
        assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["poe"]["tokens"] == 0


def test_tiny_temperature_and_top_p(http, model, tok):
    """A positive temperature below 0.01 samples at 0.01, as vLLM does; a top_p below float32's range
    keeps the top token only, i.e. greedy (the fuzz found both as 500s: 1e-198 and 8e-247)."""
    ids = tok.encode("The quick")
    body = complete(http, prompt=ids, max_tokens=6, temperature=1e-198, seed=4, return_token_ids=True)
    assert body["choices"][0]["token_ids"] == alone(model, tok, ids, 6, do_sample=True, temperature=0.01, seed=4)
    body = complete(http, prompt=ids, max_tokens=6, temperature=1.0, top_p=8e-247, seed=4, return_token_ids=True)
    assert body["choices"][0]["token_ids"] == alone(model, tok, ids, 6)


def test_logprobs_and_echo(http, model, tok):
    prompt = "The quick brown"
    ids = tok.encode(prompt)
    body = complete(http, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, echo=True, return_token_ids=True)
    c = body["choices"][0]
    new = c["token_ids"]
    assert c["text"].startswith(prompt)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) + len(new) and lp["token_logprobs"][0] is None
    with torch.no_grad():
        full = model(torch.tensor([ids + new]))[0]                      # full-PoE log-probs at every position
    want = [float(full[i - 1, t]) for i, t in enumerate(ids + new) if i > 0]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for top, chosen in zip(lp["top_logprobs"][len(ids):], lp["token_logprobs"][len(ids):]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)   # greedy: the top token
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][len(ids)] == len(prompt)
    # scoring a prompt: echo + logprobs + max_tokens 0, under a prefix mode's own distribution
    body = complete(http, prompt=prompt, max_tokens=0, logprobs=1, echo=True, poe_mode="prefix", max_stages=2)
    c = body["choices"][0]
    mix = logop([lp[0] for lp in model.stage_logprobs(torch.tensor([ids]), 2)])
    assert c["text"] == prompt and c["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert c["logprobs"]["token_logprobs"][1:] == pytest.approx([float(mix[i - 1, t]) for i, t in enumerate(ids) if i],
                                                                abs=1e-4)
    # speculative tokens follow full PoE: their log-probs are full PoE's
    body = complete(http, prompt=ids, max_tokens=4, temperature=0, logprobs=2, poe_mode="speculative",
                    return_token_ids=True)
    new = body["choices"][0]["token_ids"]
    with torch.no_grad():
        full = model(torch.tensor([ids + new]))[0]
    assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        [float(full[len(ids) - 1 + i, t]) for i, t in enumerate(new)], abs=1e-4)


# --- text: a model scripted to write Korean and emoji byte by byte ---------------------------------

@pytest.fixture(scope="module")
def scripted(tok):
    """A model whose next token depends only on the current one (every block adds zero at init), set
    so that after "Q:" it writes SCRIPT one byte-token at a time, then <|bos|> (EOS). Every Korean
    character and the emoji are split across 3-4 tokens."""
    target = [tok.mergeable_ranks[bytes([b])] for b in SCRIPT.encode()]
    chain = [tok.encode("Q:")[-1]] + target + [tok.bos_id]
    assert len(set(chain[:-1])) == len(chain) - 1
    torch.manual_seed(0)
    m = PoEGPT(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    d = m.config.n_embd
    basis = torch.linalg.qr(torch.randn(d, d))[0]
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.backout_lambda.zero_()
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            m.wte.weight[a] = 5 * basis[:, i]
            m.lm_head.weight[b] = 20 * basis[:, i]
    app = create_app(m.eval(), tok, NAME, max_batch=2)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("mode", ["full", "speculative", "wand"])
def test_sse_korean_and_emoji_never_split_and_end_with_done(scripted, mode):
    fields = {"p99_bounds": [1.0] * 3} if mode == "wand" else {}
    body = {"model": NAME, "prompt": "Q:", "max_tokens": 40, "temperature": 0, "stream": True, "poe_mode": mode,
            **fields}
    with scripted.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = sse_events(raw)
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == SCRIPT and all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) >= 5                           # it did stream, character by character
    assert events[-1]["choices"][0]["finish_reason"] == "stop"          # <|bos|> ends it
    whole = scripted.post("/v1/completions", json={**body, "stream": False}).json()
    assert whole["choices"][0]["text"] == SCRIPT and whole["usage"]["completion_tokens"] == len(SCRIPT.encode()) + 1


@pytest.mark.parametrize("stop, text", [("말", "한국어 "), (["ok", "🙂"], "한국어 말"), ("어 말🙂o", "한국"),
                                        ("nowhere", SCRIPT)])
def test_stop_strings_streaming_and_not(scripted, stop, text):
    body = {"model": NAME, "prompt": "Q:", "max_tokens": 40, "temperature": 0, "stop": stop}
    whole = scripted.post("/v1/completions", json=body).json()["choices"][0]
    events = sse_events(scripted.post("/v1/completions", json={**body, "stream": True}).text)
    assert whole["text"] == text == "".join(e["choices"][0]["text"] for e in events)
    assert whole["finish_reason"] == "stop" == events[-1]["choices"][0]["finish_reason"]


def test_echo_and_length_cap_on_text(scripted):
    c = scripted.post("/v1/completions", json={"model": NAME, "prompt": "Q:", "max_tokens": 5, "echo": True,
                                               "temperature": 0}).json()["choices"][0]
    assert c["text"] == "Q:한" and c["finish_reason"] == "length"      # 5 bytes: 한, and 국 cut off (dropped)
    events = sse_events(scripted.post("/v1/completions", json={"model": NAME, "prompt": "Q:", "max_tokens": 5,
                                                               "echo": True, "temperature": 0, "stream": True}).text)
    assert events[0]["choices"][0]["text"].startswith("Q:")
    # more tokens than the context holds (the card's 512 on a 512 model): served to the context's end
    c = scripted.post("/v1/completions", json={"model": NAME, "prompt": "Q:", "max_tokens": 64,
                                               "temperature": 0}).json()["choices"][0]
    assert c["text"] == SCRIPT


# --- limits: queue, disconnects, timeouts ----------------------------------------------------------

@pytest.fixture(scope="module")
def slow_model(tok):
    m = build_random_model(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size), seed=3)
    m.blocks[0].register_forward_pre_hook(lambda mod, a: time.sleep(0.02))   # >= 20 ms a step
    return m


def test_queue_full_429_and_disconnect_frees_the_row(slow_model, tok):
    app = create_app(slow_model, tok, NAME, max_batch=1, max_queue=1)
    long = {"model": NAME, "prompt": "The quick", "max_tokens": 50, "temperature": 0}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))   # running: it holds the only row
            waiting = []
            t = threading.Thread(target=lambda: waiting.append(
                httpx.post(url + "/v1/completions", json={**long, "max_tokens": 3}, timeout=60)))
            t.start()
            deadline = time.monotonic() + 10
            while c.get("/health").json()["queued"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r3 = c.post("/v1/completions", json=long)
            assert r3.status_code == 429 and "queue is full" in r3.json()["error"]["message"]
            assert r3.json()["error"]["code"] == "queue_full"
        # the stream is closed half way: its sequence is cancelled, and the waiting request gets the row
        t.join(30)
        assert waiting[0].status_code == 200 and waiting[0].json()["usage"]["completion_tokens"] == 3
        text = c.get("/metrics").text
        assert metric(text, "poegpt_sequences_finished_total", mode="full", reason="cancelled") == 1
        assert metric(text, "poegpt_generation_tokens_total", mode="full") < 50 + 3   # the long one stopped early
        assert metric(text, "poegpt_http_requests_total", code="429", route="/v1/completions") == 1
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=long, timeout=0.1)
        deadline = time.monotonic() + 10
        while metric(c.get("/metrics").text, "poegpt_sequences_finished_total", mode="full", reason="cancelled") < 2:
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.02)
        assert c.get("/health").json()["running"] == 0


def test_timeout_gives_504_and_stream_error(slow_model, tok):
    app = create_app(slow_model, tok, NAME, max_batch=2, timeout=0.15)
    body = {"model": NAME, "prompt": "The quick", "max_tokens": 50, "temperature": 0}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and "did not finish within 0.15 s" in r.json()["error"]["message"]
        events = sse_events(c.post("/v1/completions", json={**body, "stream": True}).text)
        assert "did not finish" in events[-1]["error"]["message"]
        with pytest.raises(openai.APIError, match="did not finish"):
            list(openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
                model=NAME, prompt="The quick", max_tokens=50, temperature=0, stream=True))
        assert c.get("/health").json()["running"] == 0


def test_drain_refuses_new_requests_and_abort_ends_the_rest(slow_model, tok):
    """The two halves of SIGTERM's drain on the scheduler: drain() answers new requests 503 and /health
    503 "draining" while the running stream goes on; abort() (at --drain-timeout) ends what is left
    with a shutdown error: an error event then [DONE] for a stream, 503 for a waiting request."""
    app = create_app(slow_model, tok, NAME, max_batch=1, max_queue=4)
    sched = app.state.scheduler
    long = {"model": NAME, "prompt": "The quick", "max_tokens": 60, "temperature": 0}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))      # running
            waiting = []
            t = threading.Thread(target=lambda: waiting.append(httpx.post(url + "/v1/completions", json=long,
                                                                          timeout=60)))
            t.start()
            deadline = time.monotonic() + 10
            while sched.queue_depth != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            sched.drain()
            r2 = c.post("/v1/completions", json=long)
            assert r2.status_code == 503 and "shutting down" in r2.json()["error"]["message"]
            h = c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "draining" and h.json()["running"] == 1
            assert next(line for line in lines if line.startswith("data: "))      # still streaming
            sched.abort()
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and "shutting down" in json.loads(rest[-2])["error"]["message"]
        t.join(30)
        assert waiting[0].status_code == 503 and "shutting down" in waiting[0].json()["error"]["message"]
        text = c.get("/metrics").text
        assert metric(text, "poegpt_sequences_finished_total", mode="full", reason="shutdown") == 2
        assert metric_sum(text, "poegpt_running_sequences") == 0 and metric(text, "poegpt_queue_depth") == 0


# --- metrics and errors ----------------------------------------------------------------------------

def test_metrics_exposition(http):
    complete(http, prompt="The", max_tokens=3, poe_mode="prefix", max_stages=2)
    complete(http, prompt="The", max_tokens=3, poe_mode="speculative", temperature=0, fallback="never")  # it drafts
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? [-+0-9.eE]+(Inf)?$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert metric(text, "poegpt_requests_total", mode="prefix") >= 1
    assert metric(text, "poegpt_requests_total", mode="speculative") >= 1
    assert metric(text, "poegpt_generation_tokens_total", mode="prefix") >= 3
    assert metric(text, "poegpt_prompt_tokens_total") > 0
    assert metric(text, "poegpt_http_requests_total", code="200", route="/v1/completions") >= 2
    assert metric(text, "poegpt_speculative_drafted_tokens_total") > 0
    assert metric(text, "poegpt_queue_depth") == 0 and metric(text, "poegpt_max_batch") == 4
    buckets = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('poegpt_request_latency_seconds_bucket{mode="prefix",le="')]
    assert buckets == sorted(buckets) and buckets[-1] == metric(text, "poegpt_request_latency_seconds_count", mode="prefix")
    for name in ("poegpt_time_to_first_token_seconds", "poegpt_queue_wait_seconds", "poegpt_decode_batch_size"):
        assert f"# TYPE {name} histogram" in text and metric(text, name + "_count") > 0


BAD = [
    ({"prompt": "x", "poe_mode": "deep"}, 400, "unknown poe_mode 'deep'", "poe_mode"),
    ({"prompt": "x", "poe_mode": "stage", "stage": 4}, 400, "stage must be integers in 0..3", "stage"),
    ({"prompt": "x", "poe_mode": "stage"}, 400, "stage mode needs stage", "stage"),
    ({"prompt": "x", "poe_mode": "prefix", "max_stages": 0}, 400, "max_stages must be an integer in 1..4", "max_stages"),
    ({"prompt": "x", "poe_mode": "composition", "stages": [0, 1], "stage_weights": [1]}, 400,
     "stage_weights has 1 entries but 2 stages", "stage_weights"),
    ({"prompt": "x", "poe_mode": "composition", "stages": [1, 1]}, 400, "duplicates", "stages"),
    ({"prompt": "x", "poe_mode": "composition", "stages": 2}, 400, "stages must be a list", "stages"),
    ({"prompt": "x", "poe_mode": "speculative", "draft_stage": 3}, 400, "draft_stage must be an integer in 0..2",
     "draft_stage"),
    ({"prompt": "x", "poe_mode": "speculative", "k_draft": 0}, 400, "k_draft must be", "k_draft"),
    ({"prompt": "x", "poe_mode": "wand"}, 400, "poegpt calibrate", "poe_mode"),
    ({"prompt": "x", "poe_mode": "wand", "p99_bounds": [1, 1, 1], "temperature": 0.7}, 400, "decodes greedily",
     "temperature"),
    ({"prompt": "x", "poe_mode": "wand", "p99_bounds": [1, 1, 1], "safety": -1}, 400, "safety must be", "safety"),
    ({"prompt": "x", "stage": 1}, 400, "stage applies to poe_mode 'stage' only", "stage"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature must be >= 0", "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p"),
    ({"prompt": "x", "top_k": 2.5}, 400, "top_k must be a positive integer", "top_k"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens must be >= 0", "max_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 9}, 400, "more than this model's context of 64", "max_tokens"),
    ({"prompt": [1] * 70}, 400, "maximum context length is 64 tokens", "prompt"),
    ({"prompt": [1] * 64, "max_tokens": 1}, 400, "maximum context length is 64 tokens", "prompt"),
    ({"prompt": ""}, 400, "prompt is empty", "prompt"),
    ({"prompt": []}, 400, "prompt is an empty list", "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt[1] is an empty list", "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt must be a string", "prompt"),
    ({"prompt": [5000]}, 400, "token id 5000 in the prompt is outside the vocabulary", "prompt"),
    ({}, 400, "prompt is required", "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n must be between 1 and 128", "n"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs must be an integer between 0 and 20", "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs must be an integer", "logprobs"),
    ({"prompt": "x", "stop": [1]}, 400, "stop must be a non-empty string", "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "only allowed when stream is true",
     "stream_options"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream must be true or false", "stream"),
    ({"prompt": "x", "seed": "1"}, 400, "seed must be an integer", "seed"),
    ({"prompt": "x", "max_token": 5}, 400, "unknown field 'max_token'", "max_token"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix is not supported", "suffix"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist", "model"),
    ({"prompt": "x", "model": None}, 400, "model is required", "model"),
]


@pytest.mark.parametrize("body, status, message, param", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_gets_one_clear_openai_error(http, body, status, message, param):
    r = http.post("/v1/completions", json={"model": NAME, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and "\n" not in err["message"]
    assert err["param"] == param and err["type"] in ("invalid_request_error",)


def test_malformed_requests_and_other_routes(http, client):
    for raw in (b"{not json", b"", b"[1, 2]", "{\"prompt\": \"\xff\"}".encode("latin-1")):
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], raw
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    r = http.get("/v2/nothing")
    assert r.status_code == 404 and "POST /v1/completions" in r.json()["error"]["message"]
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/v1/models/other").status_code == 404
    r = http.post("/v1/completions", content=json.dumps({"model": NAME, "prompt": "a\ud800b", "echo": True,
                                                         "max_tokens": 1}))
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("a\ufffdb")   # a lone surrogate
    assert http.get("/health").json()["status"] == "ok"                 # and the server is still fine


# --- the command -----------------------------------------------------------------------------------

def test_cli_serve_bad_arguments_are_one_line(tmp_path, capsys):
    from poegpt.cli import main
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "--max-batch" in err[1]


def test_cli_serve_end_to_end(proc_server):
    """`poegpt serve` on a saved checkpoint with a 512-token context answers the model card's request
    (512 new tokens at temperature 0.5: served up to the end of the context), here with the openai client."""
    c = openai.OpenAI(base_url=proc_server.url + "/v1", api_key="x", max_retries=0)
    r = c.completions.create(model="card", prompt="Once upon a time,", max_tokens=512, temperature=0.5)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 512


# --- loading, fuzzing, soak, abandoned clients, drain ----------------------------------------------

def test_health_is_503_while_the_model_loads_then_200(model, tok):
    """`poegpt serve` answers on its port while the checkpoint loads (LoadingApp): /health 503
    "loading", completions a 503 error; then 200 and served. A load that fails says why."""
    gate = threading.Event()

    def load():
        gate.wait(30)
        return create_app(model, tok, NAME, max_batch=2)

    app = LoadingApp(load)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "The", "max_tokens": 2})
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        gate.set()
        assert app.loaded.wait(30)
        assert c.get("/health").status_code == 200
        assert complete(c, prompt="The", max_tokens=2, temperature=0)["usage"]["completion_tokens"] >= 1
    errors = []

    def broken():
        raise PoEError("model.safetensors is truncated")

    app = LoadingApp(broken, errors.append)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert app.loaded.wait(30)
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "failed", "error": "model.safetensors is truncated"}
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "The"})
        assert r.status_code == 503 and "failed to load: model.safetensors is truncated" in r.json()["error"]["message"]
    assert errors == ["model.safetensors is truncated"]


# request bodies for the fuzz: a plausible request (each field valid or just out of range), the same
# with one field replaced by arbitrary JSON, a dictionary of arbitrary keys, or any JSON at all
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)
SMALL = st.integers(-1, 5)


def mostly(valid, edge):
    """`valid` nine times in ten, else `edge` (out of range or the wrong type)."""
    return st.integers(0, 9).flatmap(lambda i: edge if i == 7 else valid)   # (hypothesis favours 0 and 9)


COMMON = {
    "max_tokens": mostly(st.integers(0, 6), st.sampled_from([-1, 65, 10 ** 9, 2 ** 63, 1.5, "8"])),
    "temperature": mostly(st.floats(0, 2) | st.just(0.0), st.floats(-1, 0, exclude_max=True) | st.floats()),
    "top_p": mostly(st.floats(0.01, 1), st.floats(-0.5, 1.5)), "top_k": mostly(st.integers(-1, 400), st.integers()),
    "n": mostly(st.integers(1, 3), st.integers(-1, 200)),
    "seed": mostly(st.integers(0, 2 ** 63 - 1), st.integers(-2 ** 65, 2 ** 65)),
    "stop": mostly(st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
                   st.lists(st.text(max_size=3), max_size=20)),
    "stream": st.booleans(), "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": 1}, {}]),
    "logprobs": mostly(st.integers(0, 20), st.integers(-1, 22)), "echo": st.booleans(),
    "return_token_ids": st.booleans(), "user": st.text(max_size=4),
}
MODE_FIELDS = {
    "full": {}, "prefix": {"max_stages": mostly(st.integers(1, 4), SMALL)},
    "stage": {"stage": mostly(st.integers(0, 3), SMALL)},
    "composition": {"stages": mostly(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
                                     st.lists(SMALL, max_size=5)),
                    "stage_weights": st.lists(st.floats(-1, 3), max_size=5)},
    "wand": {"safety": mostly(st.floats(0, 3), st.floats()),
             "p99_bounds": mostly(st.lists(st.floats(0, 5) | st.just(math.inf), min_size=3, max_size=3),
                                  st.lists(st.floats(), max_size=4))},
    "speculative": {"draft_stage": mostly(st.integers(0, 2), SMALL),
                    "k_draft": mostly(st.integers(1, 5) | st.just("auto"), SMALL | st.just("x"))},
}
PROMPTS = mostly(st.text(min_size=1, max_size=12) | st.lists(st.integers(0, 319), min_size=1, max_size=20)
                 | st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
                 st.text(max_size=2) | st.lists(st.integers(-3, 700), max_size=70)
                 | st.lists(st.lists(st.integers(0, 400), max_size=4), max_size=3))
PLAUSIBLE = st.builds(lambda core, mode: {**core, **mode},
                      st.fixed_dictionaries({"model": st.just(NAME), "prompt": PROMPTS}, optional=COMMON),
                      mostly(st.sampled_from(list(MODE_FIELDS)), st.sampled_from(["deep", ""])).flatmap(
                          lambda m: st.fixed_dictionaries(
                              {"poe_mode": st.just(m), **{f: v for f, v in MODE_FIELDS.get(m, {}).items()
                                                          if f in ("max_stages", "stage", "p99_bounds")}},
                              optional={f: v for f, v in MODE_FIELDS.get(m, {}).items()
                                        if f not in ("max_stages", "stage", "p99_bounds")})))
FIELDS = ["model", "prompt", *COMMON, "poe_mode", *{f for fs in MODE_FIELDS.values() for f in fs}, "suffix",
          "best_of", "logit_bias", "presence_penalty", "frequency_penalty", "messages"]
MUTATED = st.builds(lambda body, key, value: {**body, key: value}, PLAUSIBLE, st.sampled_from(FIELDS), ANY_JSON)
ARBITRARY = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), ANY_JSON, max_size=4) | ANY_JSON
FUZZ_BODIES = st.integers(0, 9).flatmap(lambda i: PLAUSIBLE if i < 6 else MUTATED if i < 9 else ARBITRARY)


def check_answer(r: httpx.Response) -> None:
    """Any answer but a 5xx: an OpenAI error object, a completion, or an SSE stream ending with [DONE]."""
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
        assert err["type"] == "invalid_request_error"
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert all("error" not in e for e in sse_events(r.text))
    else:
        assert r.json()["object"] == "text_completion"


def fuzz_bodies(url: str, examples: int, derandomize: bool) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body=FUZZ_BODIES, raw=st.sampled_from(["json", "json-nan", "cut", "bytes"]), junk=st.binary(max_size=8))
        def fuzz(body, raw, junk):
            data = json.dumps(body, allow_nan=True).encode()   # "json-nan" also sends NaN / Infinity literals
            if raw == "json":
                data = json.dumps(body, allow_nan=False, default=str).encode() if _finite_json(body) else data
            elif raw == "cut":
                data = data[: len(data) // 2]
            elif raw == "bytes":
                data = junk + data
            check_answer(c.post("/v1/completions", content=data, headers={"Content-Type": "application/json"}))

        fuzz()
        assert c.get("/health").json()["status"] == "ok"
        text = c.get("/metrics").text
        assert not [line for line in text.splitlines() if line.startswith("poegpt_http_requests_total")
                    and 'code="5' in line]


def _finite_json(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, list):
        return all(map(_finite_json, x))
    if isinstance(x, dict):
        return all(map(_finite_json, x.values()))
    return True


def test_fuzzed_request_bodies_never_get_a_500(server):
    """Hypothesis draws request bodies (every field, plausible or arbitrary JSON, NaN and Infinity
    literals, truncated JSON, bytes that are not UTF-8): each gets a completion or a 400/404 error
    object, never a 5xx, and the server keeps serving."""
    fuzz_bodies(server[0], 150, derandomize=True)          # the same 150 bodies every run


@pytest.mark.slow
def test_fuzzed_request_bodies_never_get_a_500_long(server):
    fuzz_bodies(server[0], 2000, derandomize=False)        # new ones every run


# --- `poegpt serve` in a subprocess ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    """`poegpt serve` in a subprocess on a free loopback port, started on first use (and again if a
    test stopped it). Its stderr goes to a file, so that a full pipe never blocks the server."""

    def __init__(self, ckpt: Path, log: Path, *args: str):
        self.ckpt, self.log, self.args = ckpt, log, args
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "poegpt.cli", "serve", "--model", str(self.ckpt),
                                      "--port", str(self.port), "--log-level", "warning", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"), cwd=ROOT)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "poegpt serve did not become healthy in 90 s"
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def card_model(tok):
    return build_random_model(PoEConfig.from_preset("tiny", vocab_size=tok.vocab_size, sequence_len=512), seed=1)


@pytest.fixture(scope="module")
def proc_server(card_model, tok, tmp_path_factory):
    from poegpt.checkpoint import save_checkpoint
    d = tmp_path_factory.mktemp("serve")
    save_checkpoint(d / "ckpt", card_model, tok, meta={"step": 0})
    srv = ServeProcess(d / "ckpt", d / "stderr.txt", "--served-name", "card", "--max-batch", "8",
                       "--max-queue", "64", "--timeout", "120", "--threads", "1", "--dtype", "fp32")
    yield srv
    srv.stop()


def soak_request(i: int, tok) -> dict:
    """Client i's request: greedy or seeded sampling, in a static mode or speculative, text or ids."""
    prompt = SENTENCES[i % 5][: 4 + 3 * (i % 7)] if i % 3 else tok.encode(SENTENCES[(i + 2) % 5])[: 3 + i % 11]
    body = {"model": "card", "prompt": prompt, "temperature": 0.0}
    if i % 2:
        body.update(temperature=0.9, top_p=0.95, seed=1000 + i)
    mode = ["full", "full", "prefix", "stage", "composition", "speculative"][i % 6]
    body["poe_mode"] = mode
    body.update({"prefix": {"max_stages": 2}, "stage": {"stage": 1}, "composition": {"stages": [0, 3]},
                 "speculative": {"draft_stage": i % 3}}.get(mode, {}))
    return body


def read_stream(url: str, body: dict) -> dict:
    """A streaming request over raw HTTP: the text per choice, its finish reasons, usage, and the SSE checks."""
    with httpx.Client(timeout=120) as c:
        raw = c.post(url + "/v1/completions", json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}).text
    events = sse_events(raw)                     # ends with exactly "data: [DONE]\n\n"
    assert raw.count("data: [DONE]") == 1 and all("error" not in e for e in events)
    return {"text": "".join(e["choices"][0]["text"] for e in events[:-1]),
            "finish": [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]],
            "usage": events[-1]["usage"], "last_is_usage": events[-1]["choices"] == []}


def read_openai_stream(url: str, body: dict) -> dict:
    """The same through the openai client's streaming iterator."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    body = dict(body)
    kw = {k: body.pop(k) for k in ("model", "prompt", "temperature", "top_p", "seed") if k in body}
    chunks = list(client.completions.create(**kw, max_tokens=body.pop("max_tokens"), stream=True,
                                            stream_options={"include_usage": True}, extra_body=body))
    return {"text": "".join(ch.choices[0].text for ch in chunks[:-1]),
            "finish": [ch.choices[0].finish_reason for ch in chunks[:-1] if ch.choices[0].finish_reason],
            "usage": chunks[-1].usage.model_dump(exclude_none=True), "last_is_usage": chunks[-1].choices == []}


def soak(url: str, tok, model, rounds: int, max_tokens: int, clients: int = 32) -> None:
    """`clients` streaming clients at once, `rounds` times: every stream is complete and equals the same
    request served alone, and the usage of all of them adds up to the /metrics counters."""
    bodies = [{**soak_request(r * clients + i, tok), "max_tokens": max_tokens}
              for r in range(rounds) for i in range(clients)]
    alone_ = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for b in bodies:                         # one at a time: each request served alone
            alone_.append(c.post("/v1/completions", json={**b, "return_token_ids": True}).json())
    for b, a in zip(bodies[:6], alone_):         # and alone, the server equals the model's own method
        if b["temperature"] == 0 and b["poe_mode"] == "full":
            ids = tok.encode(b["prompt"]) if isinstance(b["prompt"], str) else b["prompt"]
            assert a["choices"][0]["token_ids"] == alone(model, tok, ids, max_tokens)
    before = httpx.get(url + "/metrics").text
    got = [None] * len(bodies)
    for r in range(rounds):
        barrier = threading.Barrier(clients)

        def client(i):
            k = r * clients + i
            barrier.wait(30)                     # all connect at once
            try:
                got[k] = (read_stream if i % 2 else read_openai_stream)(url, bodies[k])
            except BaseException as e:           # noqa: BLE001 - reported below
                got[k] = e

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    after = httpx.get(url + "/metrics").text
    for k, (b, g, a) in enumerate(zip(bodies, got, alone_)):
        assert isinstance(g, dict), (k, g)
        want = a["choices"][0]
        assert g["text"] == want["text"], (k, b)
        assert g["finish"] == [want["finish_reason"]] and g["last_is_usage"], (k, g["finish"])
        assert g["usage"] == a["usage"], k
    usage = [g["usage"] for g in got]
    d = {name: metric_sum(after, name) - metric_sum(before, name)
         for name in ("poegpt_generation_tokens_total", "poegpt_prompt_tokens_total", "poegpt_requests_total",
                      "poegpt_sequences_finished_total")}
    assert d["poegpt_generation_tokens_total"] == sum(u["completion_tokens"] for u in usage)
    assert d["poegpt_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usage)
    assert d["poegpt_requests_total"] == d["poegpt_sequences_finished_total"] == len(bodies)
    assert metric(after, "poegpt_http_requests_total", route="/v1/completions", code="200") \
        - metric(before, "poegpt_http_requests_total", route="/v1/completions", code="200") == len(bodies)
    assert metric_sum(after, "poegpt_running_sequences") == 0 and metric(after, "poegpt_queue_depth") == 0
    steps = metric(after, "poegpt_decode_batch_size_count") - metric(before, "poegpt_decode_batch_size_count")
    rows = metric(after, "poegpt_decode_batch_size_sum") - metric(before, "poegpt_decode_batch_size_sum")
    assert rows / steps > 2, "the clients were not batched together"


def test_soak_32_streaming_clients(proc_server, tok, card_model):
    soak(proc_server.url, tok, card_model, rounds=2, max_tokens=12)


@pytest.mark.slow
def test_soak_32_streaming_clients_long(proc_server, tok, card_model):
    soak(proc_server.url, tok, card_model, rounds=6, max_tokens=64)


def abandon(url: str, count: int, max_tokens: int) -> None:
    """`count` long requests whose clients go away (half streaming, half not) leave the server able to
    answer a short request within seconds, with nothing running or queued and every one cancelled."""
    before = httpx.get(url + "/metrics").text
    body = {"model": "card", "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 1.0}
    started = threading.Barrier(count)

    def client(i):
        started.wait(30)
        if i % 2:
            with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions",
                                                        json={**body, "stream": True, "seed": i}) as r:
                assert r.status_code == 200
                time.sleep(0.2)                  # gone after the headers (and maybe a few chunks)
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json={**body, "seed": i},
                           timeout=httpx.Timeout(30, read=0.4))   # gives up waiting for the answer only

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3, "temperature": 0}, timeout=30)
    answered = time.monotonic() - t0
    assert r.status_code == 200 and answered < 10, (r.status_code, answered)
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(url + "/metrics").text
        if metric_sum(text, "poegpt_running_sequences") == 0 and metric(text, "poegpt_queue_depth") == 0:
            break
        assert time.monotonic() < deadline, "abandoned requests are still running"
        time.sleep(0.05)
    finished = {reason: metric(text, "poegpt_sequences_finished_total", mode="full", reason=reason)
                - metric(before, "poegpt_sequences_finished_total", mode="full", reason=reason)
                for reason in ("cancelled", "stop", "length")}
    assert finished["length"] == 1                  # the short one; no abandoned one ran to its end
    assert finished["cancelled"] + finished["stop"] == count and finished["cancelled"] >= count - 5
    generated = metric(text, "poegpt_generation_tokens_total", mode="full") \
        - metric(before, "poegpt_generation_tokens_total", mode="full")
    assert generated < count * max_tokens / 4


def test_abandoned_long_requests_free_the_server(proc_server):
    abandon(proc_server.url, 50, 400)


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(proc_server):
    """SIGTERM: the port stops taking connections at once, the streams and the request in flight
    finish (complete, with [DONE]), and the process exits with status 0."""
    url = proc_server.url
    body = {"model": "card", "prompt": "Once upon a time,", "max_tokens": 200, "temperature": 0.7}
    chunk_times, results = [[] for _ in range(3)], [None] * 4
    first = threading.Barrier(4)

    def stream(i):
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions",
                                                      json={**body, "seed": i, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not lines:
                        first.wait(30)
                    lines.append(line)
                    chunk_times[i].append(time.monotonic())
        results[i] = "\n\n".join(lines) + "\n\n"

    def whole():
        results[3] = httpx.post(url + "/v1/completions", json={**body, "seed": 9}, timeout=120)

    threads = [threading.Thread(target=whole)] + [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    first.wait(30)                               # every stream has its first chunk (and `whole` was sent before)
    time.sleep(0.1)
    signalled = time.monotonic()
    proc_server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:                                  # new connections are refused (or told 503) within moments
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 503:
                break
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "still taking new requests after SIGTERM"
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert proc_server.proc.wait(60) == 0
    for i in range(3):
        events = sse_events(results[i])
        assert all("error" not in e for e in events) and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        if events[-1]["choices"][0]["finish_reason"] == "length":
            assert events[-1]["choices"][0]["poe"]["tokens"] == 200
    assert results[3].status_code == 200 and results[3].json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert max(max(ts) for ts in chunk_times) > signalled, "nothing was in flight when SIGTERM came"
    err = proc_server.stderr()
    assert "serving 'card'" in err and "draining" in err and "poegpt: stopped" in err
