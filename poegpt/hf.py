"""Hugging Face export and import (SPEC §9): `poegpt export-hf CHECKPOINT OUT`, `poegpt import-hf FOLDER OUT`.

The exported folder loads with `trust_remote_code=True` where poegpt is not installed:

    config.json                 PoEGPTConfig (+ auto_map, architectures, WAND bounds)
    configuration_poegpt.py     poegpt/hf_remote/configuration_poegpt.py
    modeling_poegpt.py          poegpt/hf_remote/modeling_poegpt.py
    poegpt_model.py, ...        poegpt's own modules that those import (model, engine, logop, ...)
    model.safetensors           the checkpoint's tensors, names prefixed with "model."
    generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    README.md                   model card: architecture, stages, the six modes, metrics
    eval/                       the evaluation report, when one is found

One source of truth: the modeling code in the folder *is* the package's code. The `.py` files are
copied from the package with only their relative imports rewritten for a flat folder (transformers
copies a remote module's siblings by following its `from .x import` lines), so the exported model
cannot drift from poegpt's; `remote_sources()` fails if a module of that closure imports `poegpt`
absolutely or in a form transformers would not follow. Copies of poegpt's modules get a `poegpt_`
prefix so that the folder reads as what it is.

The tokenizer becomes a plain `tokenizer.json` (`PreTrainedTokenizerFast`, no remote code): the
same split regex and byte-level BPE, with every (left, right) split of a token as a merge ranked by
the token, and whole pieces looked up first, which is how tiktoken applies the ranks; `<|bos|>` is
prepended by the post-processor when `add_special_tokens=True`, like `Tokenizer.encode`, and
special-token text typed in the input stays text. `import-hf` reverses every step exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import PoEError

PACKAGE_DIR = Path(__file__).parent
REMOTE_DIR = PACKAGE_DIR / "hf_remote"
REMOTE_ENTRIES = ("configuration_poegpt", "modeling_poegpt")
COPY_PREFIX = "poegpt_"
WEIGHT_PREFIX = "model."
AUTO_MAP = {
    "AutoConfig": "configuration_poegpt.PoEGPTConfig",
    "AutoModel": "modeling_poegpt.PoEGPTForCausalLM",
    "AutoModelForCausalLM": "modeling_poegpt.PoEGPTForCausalLM",
}
ARCHITECTURE = "PoEGPTForCausalLM"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

_RELATIVE_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<dots>\.+)(?P<module>\w+)(?P<rest>[ \t]+import\b)", re.M)
_BARE_RELATIVE_IMPORT = re.compile(r"^[ \t]*(from[ \t]+\.+[ \t]+import|import[ \t]+\.)", re.M)
_ABSOLUTE_SELF_IMPORT = re.compile(r"^[ \t]*(from|import)[ \t]+poegpt\b", re.M)


def _need_hf():
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise PoEError("the Hugging Face export needs transformers and tokenizers: pip install 'poegpt[hf]'") from None


# --- the exported source files -----------------------------------------------------------------------
def exported_name(path: Path) -> str:
    """A package module's file name in the flat exported folder."""
    path = path.resolve()
    if path.parent == REMOTE_DIR.resolve():
        return path.name
    if path.parent == PACKAGE_DIR.resolve():
        return COPY_PREFIX + path.name
    raise PoEError(f"{path} is outside poegpt/ and poegpt/hf_remote/; the export copies modules of those two only")


def remote_sources() -> dict[str, str]:
    """{file name in the folder: source}: the wrapper modules and every poegpt module they import,
    directly or not, each with its relative imports pointed at the copied siblings."""
    out: dict[str, str] = {}
    todo = [REMOTE_DIR / f"{name}.py" for name in REMOTE_ENTRIES]
    while todo:
        path = todo.pop()
        name = exported_name(path)
        if name in out:
            continue
        text = path.read_text(encoding="utf-8")
        if _ABSOLUTE_SELF_IMPORT.search(text) or _BARE_RELATIVE_IMPORT.search(text):
            raise PoEError(f"{path.name} imports poegpt absolutely or as `from . import x`; the exported folder "
                           "needs `from .module import name` imports only")

        def rewrite(m: re.Match) -> str:
            target = path.parent
            for _ in range(len(m["dots"]) - 1):
                target = target.parent
            target = target / f"{m['module']}.py"
            if not target.is_file():
                raise PoEError(f"{path.name}: cannot export `from {m['dots']}{m['module']}`, which is not a module file")
            todo.append(target)
            return f"{m['indent']}from .{exported_name(target)[:-3]}{m['rest']}"

        out[name] = _RELATIVE_IMPORT.sub(rewrite, text)
    return dict(sorted(out.items()))


# --- tokenizer --------------------------------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the other 68 bytes map to
    code points from 256 up, in byte order, so every token is a string of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer(tok):
    """poegpt's Tokenizer as a `tokenizers.Tokenizer` that encodes to the same ids."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    table = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    ranks = tok.mergeable_ranks
    merges = []
    for piece, rank in ranks.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    bpe = models.BPE(vocab={text(b): r for b, r in ranks.items()}, merges=[(m[3], m[4]) for m in merges],
                     ignore_merges=True)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([name for name, _ in specials])
    bos = "<|bos|>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                      special_tokens=[(bos, tok.bos_id)])
    for name, i in specials:
        if hf.token_to_id(name) != i:
            raise PoEError(f"special token {name} got id {hf.token_to_id(name)} in the export, not {i}")
    return hf


def save_tokenizer(tok, out: Path, context: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast
    bos = "<|bos|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(tok), bos_token=bos, eos_token=bos, pad_token=bos,
        model_max_length=context, padding_side="left", split_special_tokens=True,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    # The class name every transformers version knows (5.x resolves it to its tokenizers backend).
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = {"bos_token": bos, "eos_token": bos, "pad_token": bos}
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n")


def tokenizer_from_json(path: Path):
    """poegpt's Tokenizer back from an exported tokenizer.json."""
    from .tokenizer import SPECIAL_TOKENS, Tokenizer
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        model, pre = state["model"], state["pre_tokenizer"]
        if model["type"] != "BPE":
            raise ValueError(f"model type {model['type']}")
        split = next(p for p in pre["pretokenizers"] if p["type"] == "Split")
        pattern = split["pattern"]["Regex"]
        back = {c: b for b, c in byte_to_unicode().items()}
        specials = {t["content"]: t["id"] for t in state["added_tokens"]}
        ranks = {bytes(back[c] for c in piece): i for piece, i in model["vocab"].items() if piece not in specials}
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise PoEError(f"{path} is not a tokenizer.json written by export-hf ({type(e).__name__}: {e})") from None
    tok = Tokenizer(ranks, pattern=pattern)
    if specials != tok.special_tokens:
        raise PoEError(f"{path}: its special tokens differ from poegpt's {SPECIAL_TOKENS}")
    return tok


# --- model card ---------------------------------------------------------------------------------------
def find_eval_report(ckpt: Path, given=None) -> Path | None:
    """The evaluation report directory: --eval if given, else an eval/ of the checkpoint or its run
    whose report names this checkpoint (a report of an older checkpoint of the run is not used)."""
    from .checkpoint import resolve_checkpoint
    if given is not None:
        d = Path(given)
        if not (d / "report.json").is_file():
            raise PoEError(f"no report.json in {d}; pass the directory written by `poegpt eval --out`")
        return d
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    for d in (ckpt / "eval", run / "eval", run.parent / "eval"):
        try:
            report = json.loads((d / "report.json").read_text())
        except (OSError, ValueError):
            continue
        model = report.get("model")
        for base in (Path.cwd(), d.parent, d.parent.parent):
            try:
                if model and resolve_checkpoint(base / model).resolve() == ckpt.resolve():
                    return d
            except PoEError:
                pass
    return None


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(name: str, cfg, counts: dict, meta: dict, report: dict | None, calibration: dict) -> str:
    """The README.md of an exported folder, section by section."""
    return "\n".join([*_card_front_matter(name, cfg), *_card_architecture(cfg, counts), *_card_stages(cfg),
                      *_card_usage(name, cfg), *_card_vllm(name, cfg), *_card_wand(calibration),
                      *_card_evaluation(cfg, meta, report), *_card_files()])


def _card_front_matter(name: str, cfg) -> list[str]:
    """The Hub's YAML header, the title and what the model is."""
    return [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [poegpt, product-of-experts, log-op, custom_code]", "---", "",
        f"# {name}", "",
        "A GPT trained as a **Product of Experts over depth** with poegpt. The "
        f"{cfg.n_layer}-layer trunk is cut into {cfg.n_stages} stages; every stage boundary has a next-token head "
        "(a shared head plus an additive stage head) and the stages' distributions are combined by a "
        "geometric mean (Log-OP). One set of weights serves six inference modes.", "",
    ]


def _card_architecture(cfg, counts: dict) -> list[str]:
    """The config as a table, and what the trunk is made of."""
    return [
        "## Architecture", "",
        "| field | value |", "|---|---|",
        f"| parameters | {counts['total']:,} |",
        f"| layers / width | {cfg.n_layer} / {cfg.n_embd} |",
        f"| heads (query / key-value) × head dim | {cfg.n_head} / {cfg.n_kv_head} × {cfg.head_dim} |",
        f"| vocabulary | {cfg.vocab_size:,} |",
        f"| context | {cfg.sequence_len:,} tokens |",
        f"| attention windows | pattern {cfg.window_pattern} (last layer long): {', '.join(map(str, cfg.windows))} |",
        f"| value embeddings | {'on alternating layers' if cfg.value_embeds else 'off'} |",
        f"| logit soft-cap / rotary base | {cfg.softcap:g} / {cfg.rope_base:g} |",
        f"| training objective | {cfg.objective} (stage_grad {cfg.stage_grad}, local_weight {cfg.local_weight:g}) |",
        f"| PoE weighting | {'entropy, alpha ' + format(cfg.poe_alpha, 'g') if cfg.poe_alpha > 0 else 'uniform geometric mean'} |",
        "", "The trunk is nanochat's GPT: smear gate, resid/x0 scalars, parameter-free RMSNorm, rotary, "
        "QK-norm, GQA, sliding windows, value embeddings, ReLU² MLP, a mid-network backout "
        f"(applied to boundaries at or past layer {cfg.backout_layer}), soft-capped logits.", "",
    ]


def _card_stages(cfg) -> list[str]:
    """One row per stage: its own layers, the layers it runs, its boundary and head."""
    b = cfg.boundaries
    lines = [
        "## Stages", "",
        "| stage | own layers | runs layers | boundary | share of trunk | head |", "|---|---|---|---|---|---|",
    ]
    for k in range(cfg.n_stages):
        first = 0 if k == 0 else b[k - 1] + 1
        lines.append(f"| s{k} | {first}–{b[k]} ({cfg.stage_layout[k]}) | 0–{b[k]} | {b[k]} | "
                     f"{100 * (b[k] + 1) / cfg.n_layer:.1f}% | softcap((W_s + W_{k}) · norm(h_{b[k]})) |")
    return lines + [
        "", "Full PoE: `log p = normalise(mean_k log p_k)`. Prefix PoE of the first m stages runs layers "
        "0..b_{m-1} only.", "",
    ]


def _card_usage(name: str, cfg) -> list[str]:
    """Loading with transformers, and a call for each of the six modes."""
    K = cfg.n_stages
    return [
        "## Usage", "",
        "Offline, with `trust_remote_code=True` (the modeling files in this folder are poegpt's own "
        "modules; poegpt need not be installed):", "",
        "```python", "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
        f'path = "{name}"   # this folder, or its Hub repo id',
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)   # <|bos|> prepended",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, device_map=\"auto\")",
        'inputs = tok("The capital of France is", return_tensors="pt").to(model.device)',
        "out = model.generate(**inputs, max_new_tokens=32, do_sample=True, temperature=0.8, top_p=0.95)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
        'pipe = pipeline("text-generation", model=path, trust_remote_code=True)', "```", "",
        "`model(**inputs).logits` are the full-PoE **normalised log-probs**, so transformers' samplers draw "
        "from the PoE distribution. Batches are left-padded (`tok(texts, padding=True)`). With lm-eval: "
        "`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True,add_bos_token=True` "
        "(the model saw every document after `<|bos|>`).", "",
        "### The six inference modes", "",
        "| mode | call | runs |", "|---|---|---|",
        "| full PoE | `model.generate(**inputs, max_new_tokens=32)` | all layers, Log-OP of every stage |",
        f"| prefix | `model.generate_prefix(ids, max_stages={max(1, K // 2)}, max_new_tokens=32)` | layers 0..b_(m−1) |",
        "| single stage | `model.forward_stage(ids, stage=0)`; `model.generate_stage(ids, stage=0, max_new_tokens=32)` | layers 0..b_k, stage k's head |",
        "| WAND | `model.generate_wand(ids, max_new_tokens=32, safety=1.0, return_stages_used=True)` | stage by stage until the margin beats the calibrated bound |",
        "| self-speculative | `model.generate_speculative(ids, draft_stage=0, k_draft=3, max_new_tokens=32, return_acceptance=True)` | stages ≤ d draft, the rest verifies |",
        f"| composition | `model.generate_parallel_composition(ids, stages=[0, {K - 1}], stage_weights=[0.5, 1.0], max_new_tokens=32)` | to the deepest selected boundary, weighted Log-OP |",
        "", "`ids = inputs.input_ids`; these methods also take a list of token-id lists of different "
        "lengths, and return the prompt followed by the new tokens. Speculative greedy output equals "
        "full-PoE greedy output; with `do_sample=True` it follows the full-PoE distribution exactly.", "",
    ]


def _card_vllm(name: str, cfg) -> list[str]:
    """Serving the full (or prefix) PoE with the vLLM plugin."""
    K = cfg.n_stages
    return [
        "### vLLM", "",
        "With poegpt's vLLM plugin (`pip install 'poegpt[vllm]'`; vLLM's CPU build in an environment of its "
        "own, see poegpt's docs/vllm.md), vLLM serves the exact full-PoE distribution:", "",
        "```bash", f'vllm serve "{name}"',
        'curl -X POST "http://localhost:8000/v1/completions" -H "Content-Type: application/json" \\',
        f'  --data \'{{"model": "{name}", "prompt": "Once upon a time,", "max_tokens": '
        f'{min(512, cfg.sequence_len // 2)}, "temperature": 0.5}}\'', "```", "",
        f"`--hf-overrides '{{\"poe_max_stages\": {max(1, K // 2)}}}'` serves the prefix PoE instead (and skips the "
        "layers it does not need). WAND, self-speculative decoding and per-request modes need `poegpt serve`.", "",
    ]


def _card_wand(calibration: dict) -> list[str]:
    """The calibrated WAND bounds, or how to pass some."""
    lines = ["### WAND calibration", ""]
    bounds = calibration.get("wand_p99_bounds")
    if bounds:
        where = f" over {calibration['positions']:,} positions" if isinstance(calibration.get("positions"), int) else ""
        lines += [f"p{100 * calibration.get('quantile', 0.99):g} bounds measured by `poegpt calibrate`{where}, stored in "
                  "`config.json` (`wand_p99_bounds`), so `generate_wand` needs no arguments.", "",
                  "| after stage | bound |", "|---|---|", *[f"| s{j} | {x:.4f} |" for j, x in enumerate(bounds)], ""]
    else:
        lines += ["No WAND bounds were calibrated for this checkpoint (`poegpt calibrate`); pass "
                  "`p99_bounds=[...]` to `generate_wand`.", ""]
    return lines


def _card_evaluation(cfg, meta: dict, report: dict | None) -> list[str]:
    """The metrics of the exported eval report, else of the last validation pass of training."""
    lines = ["## Evaluation", ""]
    metrics = report.get("metrics") if report else None
    source = "from `eval/report.json` (`poegpt eval`)"
    if metrics is None and isinstance(meta.get("val"), dict) and "bpb" in meta["val"]:
        metrics = meta["val"]
        source = f"from the validation pass of training at step {meta.get('step', '?')} (no `poegpt eval` report was exported)"
    if metrics is None:
        return lines + ["No evaluation results are recorded for this checkpoint.", ""]
    lines += _card_metrics_table(metrics, source, report.get("prompt_ranks") if report else None, cfg.n_stages)
    lines.append("")
    if report:
        lines += ["The full report (JSON, CSV and figures) is in `eval/`.", ""]
    return lines


def _card_metrics_table(metrics: dict, source: str, pr: dict | None, K: int) -> list[str]:
    """The sentence saying where the metrics come from, and their table."""
    bpb, acc = metrics["bpb"], metrics.get("accuracy", {})
    lines = [f"Bits per byte (lower is better) and next-token accuracy on {metrics.get('tokens', '?'):,} "
             f"validation tokens, {source}." if isinstance(metrics.get("tokens"), int) else
             f"Bits per byte and next-token accuracy, {source}.", "",
             "| metric | value |", "|---|---|",
             f"| full PoE BPB | {_fmt(bpb['full'])} |"]
    if "entropy_weighted" in bpb:
        lines.append(f"| entropy-weighted BPB (alpha {metrics.get('entropy_alpha', '?')}) | {_fmt(bpb['entropy_weighted'])} |")
    if "full" in acc:
        lines.append(f"| full PoE next-token accuracy | {_fmt(acc['full'])} |")
    lines.append(f"| stage BPB | {' / '.join(_fmt(x) for x in bpb['stages'])} |")
    if "prefix" in bpb:
        lines.append(f"| prefix BPB (first 1..{K} stages) | {' / '.join(_fmt(x) for x in bpb['prefix'])} |")
    if "stages" in acc:
        lines.append(f"| stage accuracy | {' / '.join(_fmt(x) for x in acc['stages'])} |")
    agreement = metrics.get("agreement")
    if agreement and K > 1:
        lines.append(f"| s{K - 2}–s{K - 1} top-1 agreement | {_fmt(agreement[K - 2][K - 1])} |")
    if pr:
        lines.append(f"| prompt target rank, full PoE vs shared head | {pr['mean_rank_full']:.1f} vs "
                     f"{pr['mean_rank_shared']:.1f} (wins/ties/losses {pr['wins']}/{pr['ties']}/{pr['losses']}) |")
    return lines


def _card_files() -> list[str]:
    """What the files of the folder are."""
    return ["## Files", "",
            "`configuration_poegpt.py` and `modeling_poegpt.py` wrap poegpt's model for transformers; "
            "`poegpt_*.py` are poegpt's own modules, copied unchanged but for their relative imports. "
            "`poegpt import-hf FOLDER OUT` turns this folder back into a poegpt checkpoint.", ""]


# --- export / import ---------------------------------------------------------------------------------
def _check_out(out: Path, force: bool, protect: Path | None = None) -> None:
    if protect is not None and (out.resolve() == protect.resolve() or out.resolve() in protect.resolve().parents):
        raise PoEError(f"{out} holds the source {protect}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise PoEError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PoEError(f"{out} exists and is not empty; pass --force to replace it")


def _check_state(state: dict, cfg, where) -> None:
    """Tensor names and shapes must be those of a PoEGPT with this config."""
    import torch
    from .model import PoEModel as PoEGPT
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PoEGPT(cfg).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise PoEError(f"{where} does not match its config (first difference: {diff[0]}); it is corrupt or mixed up")


def _load_tensors(f: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(f)
    except FileNotFoundError:
        raise PoEError(f"{f} is missing") from None
    except (SafetensorError, OSError) as e:
        raise PoEError(f"{f} is not a readable safetensors file ({e})") from None


def _param_counts(cfg) -> dict:
    import torch
    from .model import PoEModel as PoEGPT
    with torch.device("meta"):
        return PoEGPT(cfg).params_by_component()


def export_hf(checkpoint, out_dir, eval_dir=None, force: bool = False, dtype: str | None = None) -> Path:
    """Write a transformers folder for a checkpoint (or the newest checkpoint of a run directory)."""
    _need_hf()
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    from .checkpoint import META_FILE, MODEL_FILE, read_meta, resolve_checkpoint
    from .config import PoEConfig
    from .fileio import atomic_directory_write
    from .hf_remote.configuration_poegpt import PoEGPTConfig
    from .tokenizer import TOKENIZER_FILE, Tokenizer

    if checkpoint is None:
        raise PoEError("give the checkpoint (or run directory) to export")
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    _check_out(out, force, protect=ckpt)
    cast = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in cast:
        raise PoEError(f"dtype must be fp32 or bf16 (or left out to keep the checkpoint's), got {dtype!r}")
    cfg = PoEConfig.load(ckpt)
    state = _load_tensors(ckpt / MODEL_FILE)
    _check_state(state, cfg, ckpt / MODEL_FILE)
    if cast[dtype] is not None:
        state = {k: v.to(cast[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    stored = {v.dtype for v in state.values() if v.is_floating_point()}
    weight_dtype = str(next(iter(stored))).replace("torch.", "") if len(stored) == 1 else "float32"
    if not (ckpt / TOKENIZER_FILE).exists():
        raise PoEError(f"{ckpt} has no {TOKENIZER_FILE}; the export needs the tokenizer the model was trained with")
    tok = Tokenizer.load(ckpt)
    if tok.vocab_size > cfg.vocab_size:
        raise PoEError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; they do not belong together")
    meta = read_meta(ckpt) if (ckpt / META_FILE).exists() else {}
    calibration = meta.get("calibration", {})
    report_dir = find_eval_report(ckpt, eval_dir)
    report = json.loads((report_dir / "report.json").read_text()) if report_dir else None
    bos = tok.bos_id
    hf_config = PoEGPTConfig.from_poe_config(
        cfg, bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP), dtype=weight_dtype, wand_p99_bounds=calibration.get("wand_p99_bounds"),
        speculative_threshold=calibration.get("speculative_threshold"))
    sources = remote_sources()

    def write(tmp: Path):
        for name, text in sources.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(hf_config.to_json_string(use_diff=True), encoding="utf-8")
        save_file({WEIGHT_PREFIX + k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        GenerationConfig(bos_token_id=bos, eos_token_id=bos, pad_token_id=bos).save_pretrained(tmp)
        save_tokenizer(tok, tmp, cfg.sequence_len)
        (tmp / "README.md").write_text(model_card(out.resolve().name, cfg, _param_counts(cfg), meta, report,
                                                  calibration), encoding="utf-8")
        if report_dir is not None:
            shutil.copytree(report_dir, tmp / "eval")

    atomic_directory_write(out, write)
    return out


def import_hf(folder, out_dir, force: bool = False) -> Path:
    """Turn an exported folder back into a poegpt checkpoint (weights, config, tokenizer, calibration)."""
    _need_hf()
    from .checkpoint import write_checkpoint
    from .hf_remote.configuration_poegpt import PoEGPTConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PoEError(f"no config.json in {folder}; point to a folder written by `poegpt export-hf`")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PoEError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    if raw.get("model_type") != "poegpt":
        raise PoEError(f"{folder} is not a folder written by export-hf (its config.json has model_type "
                       f"{raw.get('model_type')!r}, not 'poegpt')")
    out = Path(out_dir)
    _check_out(out, force, protect=folder)
    hf_config = PoEGPTConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    cfg = hf_config.to_poe_config()
    tensors = _load_tensors(folder / "model.safetensors")
    if any(not k.startswith(WEIGHT_PREFIX) for k in tensors):
        raise PoEError(f"{folder / 'model.safetensors'} has tensors outside `{WEIGHT_PREFIX}*`; it was not written by export-hf")
    state = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items()}
    _check_state(state, cfg, folder / "model.safetensors")
    tok = tokenizer_from_json(folder / "tokenizer.json")
    calibration = {}
    if hf_config.wand_p99_bounds is not None:
        calibration["wand_p99_bounds"] = list(hf_config.wand_p99_bounds)
    if hf_config.speculative_threshold:
        calibration["speculative_threshold"] = dict(hf_config.speculative_threshold)
    meta = {"imported_from": str(folder), **({"calibration": calibration} if calibration else {})}
    return write_checkpoint(out, cfg, state, tok, meta)


# --- CLI ----------------------------------------------------------------------------------------------
def cmd_export(a) -> None:
    out = export_hf(a.checkpoint, a.out, eval_dir=a.eval, force=a.force, dtype=a.dtype)
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    print(f"exported to {out}: {', '.join(files)}")
    print(f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")


def cmd_import(a) -> None:
    out = import_hf(a.folder, a.out, force=a.force)
    print(f"poegpt checkpoint written to {out}")


def add_export_parser(sub) -> None:
    """`poegpt export-hf` and `poegpt import-hf`."""
    s = sub.add_parser("export-hf", help="write a transformers folder (trust_remote_code) for a checkpoint")
    s.add_argument("checkpoint", help="checkpoint or run directory (its newest checkpoint)")
    s.add_argument("out", help="output folder")
    s.add_argument("--eval", help="evaluation report directory (`poegpt eval --out`); found next to the run if left out")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="weight dtype (default: as stored)")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("import-hf", help="turn a folder written by export-hf back into a poegpt checkpoint")
    s.add_argument("folder", help="folder written by poegpt export-hf")
    s.add_argument("out", help="checkpoint directory to write")
    s.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    s.set_defaults(fn=cmd_import)
