"""Decode speed of every PoE mode, side by side in one run, against full-PoE greedy.

For each mode: tokens/s (greedy, batch 1, wall clock over all prompts), speedup over full greedy,
layer evaluations per generated token (counted with hooks in a separate, untimed run; speculative
and WAND include their drafting / lazy-fill work), agreement of the tokens with full greedy, and
for speculative decoding the acceptance rate and τ (tokens emitted per verification pass, bonus
included). Prints a table, then one JSON line.

    python bench/decode.py --model runs/demo/run            # a trained checkpoint (calibrated for WAND)
    python bench/decode.py --depth 12 --vocab-size 8192      # random weights: speed only
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from poegpt.engine import Generation, Sampling
from poegpt.modes import ModeSpec, mode_steps

PROMPTS = ["The capital of France is", "대한민국의 수도는", "def fibonacci(n):", "In the beginning",
           "La capital de España es", "東京は日本の"]


def run(model, rows, spec, n):
    """Each prompt alone (batch 1); returns the merged Generation and the total wall time."""
    merged = Generation([], stages_used=[])
    t0 = time.perf_counter()
    for row in rows:
        steps, gen = mode_steps(model, [row], spec, n, Sampling())
        for _ in steps:
            pass
        merged.tokens += gen.tokens
        merged.stages_used += gen.stages_used or []
        merged.accepted += gen.accepted
        merged.drafted += gen.drafted
        merged.passes += gen.passes
        for key, value in gen.extra.items():
            merged.extra[key] = merged.extra.get(key, 0) + value / len(rows)
    return merged, time.perf_counter() - t0


def layer_evals(model, rows, spec, n) -> int:
    count = [0]
    hooks = [b.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + i[0].shape[0] * i[0].shape[1]))
             for b in model.blocks]
    try:
        run(model, rows, spec, n)
    finally:
        for h in hooks:
            h.remove()
    return count[0] - prefill_evals(model, rows, spec)


def prefill_evals(model, rows, spec) -> int:
    """Layer evaluations a mode spends on the prompt before its first decode step."""
    b = model.config.boundaries
    if spec.mode == "speculative":        # all layers for the prompt but its last token (the first pending input)
        return sum(len(r) - 1 for r in rows) * model.config.n_layer
    if spec.mode == "wand":               # stage 0 on the prompt; deeper layers are filled lazily, as decode work
        return sum(len(r) for r in rows) * (b[0] + 1)
    return sum(len(r) for r in rows) * (b[spec.stage_mix(model).depth - 1] + 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint or run directory (default: the shipped demo model)")
    ap.add_argument("--depth", type=int, help="random weights at this depth instead of a checkpoint")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode (best is kept)")
    ap.add_argument("--safety", type=float, default=1.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.depth:
        from poegpt import PoEConfig, PoEGPT
        model = PoEGPT(PoEConfig.from_depth(a.depth, vocab_size=a.vocab_size, sequence_len=512)).eval()
        with torch.no_grad():   # random but not degenerate: init zeroes the output projections and stage heads
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        rows = [torch.randint(0, a.vocab_size, (8,)).tolist() for _ in range(4)]
        name = f"random depth {a.depth}"
    else:
        from poegpt.checkpoint import load_model
        model, tok = load_model(a.model)
        rows = [tok.encode(p) for p in PROMPTS]
        name = str(a.model or "demo")
    cfg = model.config
    K = cfg.n_stages
    has_bounds = "wand_p99_bounds" in getattr(model, "checkpoint_meta", {}).get("calibration", {})
    specs = [("full", ModeSpec("full"))]
    specs += [(f"prefix {m}", ModeSpec("prefix", max_stages=m)) for m in range(1, K)]
    specs += [(f"stage {k}", ModeSpec("stage", stage=k)) for k in (0, K - 1)]
    specs += [(f"composition {tuple(range(0, K, 2))}", ModeSpec("composition", stages=tuple(range(0, K, 2))))]
    for d in range(K - 1):
        for k in (2, 3, 5, "auto"):
            specs.append((f"speculative d{d} k{k}", ModeSpec("speculative", draft_stage=d, k_draft=k)))
    if has_bounds:
        specs.append((f"wand safety {a.safety}", ModeSpec("wand", safety=a.safety)))
    specs.append(("wand (inf bounds)", ModeSpec("wand", p99_bounds=(float("inf"),) * (K - 1))))

    results = []
    reference = None
    for label, spec in specs:
        best = None
        for _ in range(a.repeats):
            gen, dt = run(model, [r for r in rows], spec, a.tokens)
            best = dt if best is None else min(best, dt)
        n = sum(len(t) for t in gen.tokens)
        if label == "full":
            reference = gen.tokens
        same = sum(x == y for g, r in zip(gen.tokens, reference) for x, y in zip(g, r))
        row = {"mode": label, "tok_s": n / best, "seconds": best, "tokens": n,
               "layers_per_token": layer_evals(model, rows, spec, a.tokens) / n,
               "agreement_with_full": same / sum(len(r) for r in reference),
               "identical_to_full": gen.tokens == reference}
        if spec.mode == "speculative":
            row["acceptance"] = gen.acceptance
            row["tau"] = n / max(gen.passes, 1)
        if spec.mode == "wand":
            row.update(gen.extra)
        results.append(row)
    base = results[0]["tok_s"]
    print(f"model: {name} ({cfg.n_layer} layers as {list(cfg.stage_layout)}, d={cfg.n_embd}, V={cfg.vocab_size}); "
          f"{len(rows)} prompts x {a.tokens} tokens, greedy, batch 1, {torch.get_num_threads()} threads")
    print(f"{'mode':<26}{'tok/s':>8}{'speedup':>9}{'layers/tok':>11}{'accept':>8}{'tau':>6}{'agree':>7}{'same':>6}")
    for r in results:
        r["speedup_vs_full"] = r["tok_s"] / base
        print(f"{r['mode']:<26}{r['tok_s']:>8.1f}{r['speedup_vs_full']:>9.2f}{r['layers_per_token']:>11.2f}"
              f"{r.get('acceptance', float('nan')):>8.2f}{r.get('tau', float('nan')):>6.2f}"
              f"{r['agreement_with_full']:>7.3f}{'yes' if r['identical_to_full'] else 'no':>6}")
    print(json.dumps({"bench": "decode", "model": name, "n_layer": cfg.n_layer, "stage_layout": list(cfg.stage_layout),
                      "tokens": a.tokens, "prompts": len(rows), "results": results}))


if __name__ == "__main__":
    main()
