"""The model card of an exported folder (its README.md): architecture, stages, usage of the six
modes, vLLM, WAND calibration, evaluation metrics and the folder's files, one function a section."""

from __future__ import annotations


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
