"""The Hugging Face export (docs/design.md §10.3): the folder loads where poegpt cannot be imported and computes
what poegpt computes.

One export of a tiny random model (fp32) is shared by the module. One subprocess, in which
`import poegpt` fails, loads it through transformers' remote code and records forward log-probs,
generations (cached, uncached, left-padded batches, sampling, bf16, pipeline), the six modes, the
tokenizer and an lm-eval run on a local task; the tests compare each record with native poegpt.
"""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from poegpt import PoEError
from poegpt.checkpoint import load_model, save_checkpoint
from poegpt.integrations.hf.export import export_hf, import_hf, remote_sources
from poegpt.tokenizer import Tokenizer

from conftest import build_random_model

REPO = Path(__file__).resolve().parents[1]
BOUNDS = [6.0, 3.0, 1.5]
AGREEMENT = {"0": 0.3, "1": 0.2, "2": 0.1}
TEXTS = ["The capital of France is", "대한민국의 수도는 서울입니다.", "emoji 🎉👍🏽 and a family 👨‍👩‍👧!",
         "def fibonacci(n):\n    return n", "<|bos|> typed as text"]
BATCH_TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog", "대한민국의 수도는 🎉"]
LM_EVAL_DOCS = [{"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "answer": 0},
                {"question": "대한민국의 수도는", "choices": ["서울", "부산"], "answer": 0}]

# Every script below runs in a fresh interpreter (python -I) where poegpt cannot be imported.
BLOCK_POEGPT = r'''
import sys


class BlockPoegpt:
    def find_spec(self, name, path=None, target=None):
        if name == "poegpt" or name.startswith("poegpt."):
            raise ImportError(f"{name} is blocked: the export must not need poegpt")


sys.meta_path.insert(0, BlockPoegpt())
'''


def run_without_poegpt(script: str, args: list, work: Path, name: str) -> None:
    """Write `script` (after the poegpt blocker) to work/name and run it offline, poegpt unimportable."""
    (work / name).write_text(BLOCK_POEGPT + script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HOME=str(work / "hf_home"))
    r = subprocess.run([sys.executable, "-I", str(work / name), *map(str, args)], cwd=work, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


# Loads the tiny export and writes what it computed.
REMOTE_SCRIPT = r'''
import inspect, json
folder, work = sys.argv[1], sys.argv[2]
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

inputs = json.load(open(f"{work}/inputs.json"))
res, tensors = {}, {}
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
res["tok_ids"] = [tok(t).input_ids for t in inputs["texts"]]
res["tok_ids_plain"] = [tok(t, add_special_tokens=False).input_ids for t in inputs["texts"]]
res["tok_decoded"] = [tok.decode(ids, skip_special_tokens=True) for ids in res["tok_ids"]]

model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
res["module"] = type(model).__module__
ids = torch.tensor([inputs["prompt"]])
with torch.no_grad():
    tensors["forward"] = model(torch.tensor(inputs["batch"])).logits
    cache = DynamicCache(config=model.config)          # a prompt, then token by token through the cache
    steps = [model(ids[:, :7], cache=cache).logits]
    for t in range(7, ids.size(1)):
        steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    tensors["forward_stepwise"] = torch.cat(steps, 1)
greedy = dict(max_new_tokens=24, do_sample=False)
tensors["greedy_cached"] = model.generate(ids, **greedy)
tensors["greedy_uncached"] = model.generate(ids, use_cache=False, **greedy)
enc = tok(inputs["batch_texts"], return_tensors="pt", padding=True)
tensors["padded_mask"] = enc.attention_mask
tensors["padded_greedy"] = model.generate(**enc, max_new_tokens=20, do_sample=False)
sampled = []
for _ in range(2):
    torch.manual_seed(0)
    sampled.append(model.generate(**tok(inputs["texts"][0], return_tensors="pt"), max_new_tokens=16,
                                  do_sample=True, temperature=0.8, top_p=0.95))
tensors["sampled_a"], tensors["sampled_b"] = sampled

tensors["mode_forward_stage"] = model.forward_stage(ids, stage=1)
tensors["mode_prefix"] = model.generate_prefix(ids, max_stages=2, max_new_tokens=12)
tensors["mode_stage"] = model.generate_stage(ids, stage=0, max_new_tokens=12)
out, res["wand_stages"] = model.generate_wand(ids, max_new_tokens=12, return_stages_used=True)
tensors["mode_wand"] = out
out, res["spec_acceptance"] = model.generate_speculative(ids, draft_stage=1, k_draft=3, max_new_tokens=12,
                                                         return_acceptance=True, fallback="never")
tensors["mode_speculative"] = out
tensors["mode_speculative_auto_sampled"] = model.generate_speculative(inputs["rows"], draft_stage=0, k_draft="auto",
                                                                      max_new_tokens=12, do_sample=True, seed=3)
tensors["mode_composition"] = model.generate_parallel_composition(ids, stages=[0, 3], stage_weights=[0.5, 1.0],
                                                                  max_new_tokens=12)
res["signatures"] = {name: str(inspect.signature(getattr(model, name))) for name in inputs["modes"]}

bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto")
res["bf16_dtype"] = str(bf16.dtype)
with torch.no_grad():
    tensors["bf16_forward"] = bf16(torch.tensor(inputs["batch"])).logits
tensors["bf16_greedy"] = bf16.generate(**tok(inputs["texts"][0], return_tensors="pt"), max_new_tokens=8, do_sample=False)

pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
res["pipeline"] = pipe(inputs["texts"][0], max_new_tokens=10, do_sample=False)[0]["generated_text"]

import lm_eval
from lm_eval.tasks import TaskManager
ev = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,add_bos_token=True,"
                             "dtype=float32", tasks=["poegpt_tiny"], task_manager=TaskManager(include_path=f"{work}/task"),
                             device="cpu", batch_size=2, log_samples=True)
res["lm_eval_acc"] = ev["results"]["poegpt_tiny"]["acc,none"]
res["lm_eval_samples"] = [[list(s["arguments"][i]) + [s["resps"][i][0][0]] for i in range(len(s["arguments"]))]
                          for s in ev["samples"]["poegpt_tiny"]]

res["poegpt_modules"] = sorted(m for m in sys.modules if m == "poegpt" or m.startswith("poegpt."))
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{work}/tensors.safetensors")
json.dump(res, open(f"{work}/results.json", "w"))
'''


def tiny_tokenizer() -> Tokenizer:
    from poegpt.data import load_mixture, read_documents
    mixture = load_mixture("sample")
    return Tokenizer.train([d for s in mixture.sources for _, d in zip(range(40), read_documents(s))], 512)


def write_eval_report(ckpt: Path) -> None:
    """A `poegpt eval`-shaped report next to the checkpoint, naming it (numbers are made up)."""
    d = ckpt / "eval"
    d.mkdir()
    metrics = {"tokens": 4096, "bytes": 12000, "entropy_alpha": 1.0,
               "bpb": {"full": 2.3456, "entropy_weighted": 2.4, "stages": [2.9, 2.8, 2.7, 2.6],
                       "prefix": [2.9, 2.5, 2.4, 2.3456]},
               "accuracy": {"full": 0.31, "stages": [0.25, 0.26, 0.27, 0.28]},
               "agreement": [[1.0, 0.5, 0.5, 0.5], [0.5, 1.0, 0.6, 0.6], [0.5, 0.6, 1.0, 0.8973], [0.5, 0.6, 0.8973, 1.0]]}
    (d / "report.json").write_text(json.dumps({"model": str(ckpt), "metrics": metrics, "data": "x"}))
    (d / "metrics.csv").write_text("metric,value\nfull_bpb,2.3456\n")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer()
    model = build_random_model(seed=11)
    ckpt = save_checkpoint(root / "ckpt", model, tok, meta={
        "step": 5, "calibration": {"wand_p99_bounds": BOUNDS, "quantile": 0.99, "positions": 1000,
                                   "speculative_agreement": AGREEMENT}})
    write_eval_report(ckpt)
    folder = export_hf(ckpt, root / "poegpt-tiny-hf")
    native, native_tok = load_model(ckpt)
    return {"root": root, "ckpt": ckpt, "folder": folder, "model": native, "tok": native_tok}


@pytest.fixture(scope="module")
def remote(exported):
    """Run REMOTE_SCRIPT once on the exported folder; return (results, tensors, inputs)."""
    root, tok = exported["root"], exported["tok"]
    work = root / "remote"
    (work / "task").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    inputs = {"texts": TEXTS, "batch_texts": BATCH_TEXTS,
              "prompt": tok.encode("The capital of France is") + torch.randint(0, 503, (12,), generator=g).tolist(),
              "batch": torch.randint(0, 512, (2, 30), generator=g).tolist(),
              "rows": [tok.encode("Hi"), tok.encode("대한민국의 수도는 서울입니다.")],
              "modes": ["forward_stage", "generate_prefix", "generate_stage", "generate_wand",
                        "generate_speculative", "generate_parallel_composition"]}
    (work / "inputs.json").write_text(json.dumps(inputs))
    (work / "task" / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in LM_EVAL_DOCS))
    (work / "task" / "poegpt_tiny.yaml").write_text(
        "task: poegpt_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {work / 'task' / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    run_without_poegpt(REMOTE_SCRIPT, [exported["folder"], work], work, "remote.py")
    return json.loads((work / "results.json").read_text()), load_file(work / "tensors.safetensors"), inputs


# --- the folder -------------------------------------------------------------------------------------
def test_folder_layout_config_and_card(exported):
    folder = exported["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_poegpt.py", "modeling_poegpt.py", "poegpt_model.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "README.md", "eval"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "poegpt" and cfg["architectures"] == ["PoEGPTForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_poegpt.PoEGPTForCausalLM"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_poegpt.PoEGPTConfig"
    assert "AutoTokenizer" not in cfg["auto_map"]            # the tokenizer needs no remote code
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["stage_layout"]) == (8, 64, [4, 2, 1, 1])
    assert cfg["wand_p99_bounds"] == BOUNDS and cfg["speculative_agreement"] == AGREEMENT
    assert "sliding_window" not in cfg
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    card = (folder / "README.md").read_text()
    assert "| s0 | 0–3 (4) | 0–3 | 3 | 50.0% |" in card and "| s3 | 7–7 (1) | 0–7 | 7 | 100.0% |" in card
    assert "2.3456" in card and "0.8973" in card and "| s2 | 1.5000 |" in card
    for call in ("generate_prefix(", "forward_stage(", "generate_stage(", "generate_wand(", "generate_speculative(",
                 "generate_parallel_composition(", "model.generate(**inputs"):
        assert call in card
    assert (folder / "eval" / "metrics.csv").read_text().startswith("metric,value")


def test_exported_modules_are_the_package_sources(exported):
    """Each .py file in the folder equals its package source up to the relative imports' module names."""
    def strip_imports(text):
        return re.sub(r"^([ \t]*)from \.+(?:poegpt_)?(\w+) import", r"\1from .\2 import", text, flags=re.M)

    files = sorted(exported["folder"].glob("*.py"))
    assert {f.name for f in files} == set(remote_sources())
    for f in files:
        src = (REPO / "poegpt" / f.name[len("poegpt_"):] if f.name.startswith("poegpt_")
               else REPO / "poegpt" / "integrations" / "hf" / "remote" / f.name)
        text = f.read_text()
        assert strip_imports(text) == strip_imports(src.read_text()), f.name
        assert not re.search(r"^\s*(from|import)\s+poegpt\b", text, re.M), f.name
        for module in re.findall(r"^\s*from \.(\w+) import", text, re.M):   # transformers copies these siblings
            assert (exported["folder"] / f"{module}.py").is_file(), (f.name, module)


# --- the loaded model (subprocess without poegpt) ---------------------------------------------------
def test_loaded_without_poegpt(remote):
    res, _, _ = remote
    assert res["poegpt_modules"] == []
    assert res["module"].startswith("transformers_modules.") and res["module"].endswith(".modeling_poegpt")


def test_forward_is_full_poe_logprobs(exported, remote):
    _, t, inputs = remote
    model = exported["model"]
    with torch.no_grad():
        ref = model(torch.tensor(inputs["batch"]))
        torch.testing.assert_close(t["forward"], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(t["forward_stepwise"], model(torch.tensor([inputs["prompt"]])), atol=1e-5, rtol=0)
    torch.testing.assert_close(t["forward"].exp().sum(-1), torch.ones(2, 30), atol=1e-4, rtol=0)


def test_greedy_generate_cached_uncached_native(exported, remote):
    _, t, inputs = remote
    bos = exported["tok"].bos_id
    native = exported["model"].generate(torch.tensor([inputs["prompt"]]), max_new_tokens=24, eos_token_id=bos)
    assert torch.equal(t["greedy_cached"], t["greedy_uncached"])
    assert torch.equal(t["greedy_cached"], native)


def test_left_padded_batch_equals_each_prompt_alone(exported, remote):
    _, t, _ = remote
    model, tok = exported["model"], exported["tok"]
    mask, out = t["padded_mask"], t["padded_greedy"]
    assert not bool(mask[0].all()) and bool(mask[1].all())         # rows really are left-padded
    width = mask.size(1)
    for r, text in enumerate(BATCH_TEXTS):
        prompt = tok.encode(text)
        assert mask[r].sum() == len(prompt) and out[r, width - len(prompt):width].tolist() == prompt
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=20, eos_token_id=tok.bos_id)[0, len(prompt):].tolist()
        new = out[r, width:].tolist()
        assert new[:len(alone)] == alone, r


def test_sampling_bf16_and_pipeline(exported, remote):
    res, t, inputs = remote
    model, tok = exported["model"], exported["tok"]
    assert t["sampled_a"].shape[1] > len(tok.encode(TEXTS[0])) and torch.equal(t["sampled_a"], t["sampled_b"])
    assert res["bf16_dtype"] == "torch.bfloat16" and torch.isfinite(t["bf16_forward"]).all()
    bf16, _ = load_model(exported["ckpt"], dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(t["bf16_forward"], bf16(torch.tensor(inputs["batch"])), atol=1e-5, rtol=0)
    prompt = tok.encode(TEXTS[0])
    native = model.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=tok.bos_id)
    assert res["pipeline"] == tok.decode(native[0].tolist(), skip_special_tokens=True)


def test_six_modes_equal_native(exported, remote):
    res, t, inputs = remote
    model = exported["model"]
    ids = torch.tensor([inputs["prompt"]])
    torch.testing.assert_close(t["mode_forward_stage"], model.forward_stage(ids, stage=1), atol=0, rtol=0)
    assert torch.equal(t["mode_prefix"], model.generate_prefix(ids, max_stages=2, max_new_tokens=12))
    assert torch.equal(t["mode_stage"], model.generate_stage(ids, stage=0, max_new_tokens=12))
    out, stages = model.generate_wand(ids, max_new_tokens=12, return_stages_used=True)   # bounds from the checkpoint
    assert torch.equal(t["mode_wand"], out) and res["wand_stages"] == stages
    out, acceptance = model.generate_speculative(ids, draft_stage=1, k_draft=3, max_new_tokens=12, return_acceptance=True,
                                                 fallback="never")
    assert torch.equal(t["mode_speculative"], out) and res["spec_acceptance"] == acceptance
    assert torch.equal(t["mode_speculative_auto_sampled"], model.generate_speculative(
        inputs["rows"], draft_stage=0, k_draft="auto", max_new_tokens=12, do_sample=True, seed=3))
    assert torch.equal(t["mode_composition"], model.generate_parallel_composition(
        ids, stages=[0, 3], stage_weights=[0.5, 1.0], max_new_tokens=12))
    assert res["signatures"] == {name: str(inspect.signature(getattr(model, name))) for name in inputs["modes"]}
    assert len(set(map(len, res["wand_stages"]))) == 1 and len(set(res["wand_stages"][0])) > 1  # exits really vary


def test_tokenizer_ids_and_decoding_equal_poegpt(exported, remote):
    res, _, _ = remote
    tok = exported["tok"]
    assert res["tok_ids"] == [tok.encode(text) for text in TEXTS]              # <|bos|> first, as poegpt encodes
    assert res["tok_ids_plain"] == [tok.encode(text, add_special_tokens=False) for text in TEXTS]
    assert res["tok_decoded"] == TEXTS


def test_lm_eval_hf_model_scores_like_native(exported, remote):
    """lm-eval's `hf` model (`pretrained=FOLDER,trust_remote_code=True`) on a local multiple-choice task:
    every loglikelihood equals the native full-PoE one."""
    res, _, _ = remote
    model, tok = exported["model"], exported["tok"]
    samples = [s for doc in res["lm_eval_samples"] for s in doc]
    assert len(samples) == sum(len(d["choices"]) for d in LM_EVAL_DOCS) and 0 <= res["lm_eval_acc"] <= 1
    for context, continuation, ll in samples:
        ctx = tok.encode(context)
        whole = tok.encode(context + continuation)
        assert whole[:len(ctx)] == ctx
        with torch.no_grad():
            logp = model(torch.tensor([whole[:-1]]))[0]
        ref = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(whole[len(ctx):]))
        assert abs(ll - ref) < 1e-4, (context, continuation)


# --- in-process: the package's wrapper, import-hf, bad input -----------------------------------------
@pytest.fixture(scope="module")
def wrapper(exported):
    from poegpt.integrations.hf.remote.modeling_poegpt import PoEGPTForCausalLM
    return PoEGPTForCausalLM.from_pretrained(exported["folder"]).eval()


def test_cache_keyword_names_and_config_built_cache(exported, wrapper):
    """5.24 passes the cache as `cache=`, 5.19 as `past_key_values=`; both, and a config-built cache, give
    the uncached log-probs."""
    from transformers import DynamicCache
    ids = torch.tensor([exported["tok"].encode("The capital of France is Paris, and")])
    with torch.no_grad():
        full = wrapper(ids, use_cache=False).logits
        for make, keyword in ((DynamicCache, "past_key_values"), (lambda: DynamicCache(config=wrapper.config), "cache")):
            cache = make()
            a = wrapper(ids[:, :4], **{keyword: cache}).logits
            b = wrapper(ids[:, 4:], **{keyword: cache}).logits
            torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)
            assert cache.get_seq_length() == ids.size(1)


def test_import_hf_round_trip_is_exact(exported, tmp_path):
    from poegpt.config import PoEConfig
    ckpt = import_hf(exported["folder"], tmp_path / "back")
    a, b = load_file(exported["ckpt"] / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert PoEConfig.load(ckpt).to_dict() == PoEConfig.load(exported["ckpt"]).to_dict()
    assert (ckpt / "tokenizer_bpe.json").read_bytes() == (exported["ckpt"] / "tokenizer_bpe.json").read_bytes()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["calibration"] == {"wand_p99_bounds": BOUNDS, "speculative_agreement": AGREEMENT}
    model, tok = load_model(ckpt)
    ids = torch.tensor([tok.encode("round trip")])
    assert torch.equal(model.generate_wand(ids, max_new_tokens=4), exported["model"].generate_wand(ids, max_new_tokens=4))


def test_export_bf16_and_a_report_of_another_checkpoint(exported, tmp_path):
    """A report that names another checkpoint is not this one's: the card falls back to training's
    validation metrics. --dtype bf16 casts the weights and says so in config.json."""
    tok, model = exported["tok"], exported["model"]
    val = {"tokens": 2048, "bpb": {"full": 3.1415, "stages": [3.5, 3.4, 3.3, 3.2]}}
    ckpt = save_checkpoint(tmp_path / "ck", model, tok, meta={"step": 9, "val": val})
    write_eval_report(ckpt)
    report = json.loads((ckpt / "eval" / "report.json").read_text())
    (ckpt / "eval" / "report.json").write_text(json.dumps({**report, "model": str(exported["ckpt"])}))
    folder = export_hf(ckpt, tmp_path / "out", dtype="bf16")
    card = (folder / "README.md").read_text()
    assert "3.1415" in card and "step 9" in card and "2.3456" not in card and not (folder / "eval").exists()
    assert "No WAND bounds were calibrated" in card
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["wand_p99_bounds"] is None
    weights = load_file(folder / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    assert torch.equal(weights["model.wte.weight"], model.wte.weight.detach().to(torch.bfloat16))


def test_bad_input_is_one_clear_error(exported, tmp_path, capsys):
    from poegpt.cli import main
    folder, ckpt = exported["folder"], exported["ckpt"]
    with pytest.raises(PoEError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(PoEError, match="not empty; pass --force"):
        export_hf(ckpt, folder)
    with pytest.raises(PoEError, match="holds the source"):
        export_hf(ckpt, ckpt, force=True)
    bare = save_checkpoint(tmp_path / "bare", build_random_model(seed=1), meta={"step": 0})
    with pytest.raises(PoEError, match="no tokenizer_bpe.json"):
        export_hf(bare, tmp_path / "out")
    with pytest.raises(PoEError, match="not a folder written by export-hf"):
        import_hf(ckpt, tmp_path / "back")
    with pytest.raises(PoEError, match="not empty; pass --force"):
        import_hf(folder, ckpt)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "model.safetensors"):
        (broken / f).write_bytes((folder / f).read_bytes())
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(PoEError, match="not a tokenizer.json written by export-hf"):
        import_hf(broken, tmp_path / "back")
    assert not (tmp_path / "out").exists() and not (tmp_path / "back").exists()
    for argv in (["export-hf", str(tmp_path / "missing"), str(tmp_path / "o")], ["import-hf", str(ckpt), str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("poegpt: error:"), err


def test_forward_bad_input(wrapper):
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(PoEError, match="attention_mask must be"):
        wrapper(ids, attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(PoEError, match="inputs_embeds is not supported"):
        wrapper(inputs_embeds=torch.zeros(1, 4, 64))
    with pytest.raises(PoEError, match="transformers Cache"):
        wrapper(ids, past_key_values=((torch.zeros(1), torch.zeros(1)),))
    with pytest.raises(PoEError, match="needs a DynamicCache"):
        wrapper.generate(ids, max_new_tokens=2, cache_implementation="static")


@pytest.mark.slow
def test_lm_eval_cli_on_a_local_task(exported, remote):
    """The documented command line: `lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True`."""
    root = exported["root"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(root / "hf_home")}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={exported['folder']},trust_remote_code=True,add_bos_token=True,dtype=float32",
                        "--tasks", "poegpt_tiny", "--include_path", str(root / "remote" / "task"), "--device", "cpu",
                        "--batch_size", "2"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "poegpt_tiny" in r.stdout and "acc" in r.stdout


# The model card's own snippets, as written (the local folder in place of the hub id), on the export of
# the shipped demo model; poegpt is unimportable in the subprocess.
CARD_SCRIPT = r'''
import json
repo, out_file = sys.argv[1], sys.argv[2]
res = {}
# --- the card, "Transformers" ---
from transformers import pipeline
pipe = pipeline("text-generation", model=repo, trust_remote_code=True)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype="auto")
res["auto_dtype"] = str(model.dtype)
# --- the card, "Loading" ---
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(
    repo,
    trust_remote_code=True,
    dtype=torch.bfloat16,
    device_map="auto",
)
ids = tok("대한민국의 수도는", return_tensors="pt").to(model.device)
out = model.generate(**ids, max_new_tokens=32, do_sample=True, temperature=0.8, top_p=0.95)
res["sampled_text"] = tok.decode(out[0], skip_special_tokens=True)
# --- the card, "Full PoE" and "Prefix-Pruned" ---
ids = tok("The capital of France is", return_tensors="pt").to(model.device)
out = model.generate(**ids, max_new_tokens=32, do_sample=False)
res["bf16_greedy"] = out[0].tolist()
res["bf16_prefix2"] = model.generate_prefix(ids.input_ids, max_stages=2, max_new_tokens=32)[0].tolist()
fp32 = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32)
res["fp32_greedy"] = fp32.generate(**ids, max_new_tokens=32, do_sample=False)[0].tolist()
with torch.no_grad():
    res["fp32_logprobs_last"] = fp32(ids.input_ids).logits[0, -1].tolist()
res["pipeline"] = pipe("대한민국의 수도는", max_new_tokens=8, do_sample=False)[0]["generated_text"]
json.dump(res, open(out_file, "w"))
'''


def test_card_snippets_on_the_exported_demo_model(tmp_path):
    """The shipped demo model exported and loaded exactly as the card shows equals native poegpt."""
    from poegpt.checkpoint import DEMO_MODEL_DIR
    folder = export_hf(DEMO_MODEL_DIR, tmp_path / "poegpt-demo")
    run_without_poegpt(CARD_SCRIPT, [folder, tmp_path / "out.json"], tmp_path, "card.py")
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["auto_dtype"] == "torch.bfloat16"                           # the demo ships bf16 weights
    assert res["sampled_text"].startswith("대한민국의 수도는") and len(res["sampled_text"]) > len("대한민국의 수도는")
    fp32, tok = load_model(None)
    bf16, _ = load_model(None, dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("The capital of France is")])
    assert res["fp32_greedy"] == fp32.generate(ids, max_new_tokens=32, eos_token_id=tok.bos_id)[0].tolist()
    assert res["bf16_greedy"] == bf16.generate(ids, max_new_tokens=32, eos_token_id=tok.bos_id)[0].tolist()
    assert res["bf16_prefix2"] == bf16.generate_prefix(ids, max_stages=2, max_new_tokens=32)[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(res["fp32_logprobs_last"]), fp32(ids)[0, -1], atol=1e-5, rtol=0)
    assert res["pipeline"].startswith("대한민국의 수도는")
