"""Dense-verified self-speculative decoding on an adapted nanochat model, against plain dense greedy.

Imports the nanochat d4 of tests/fixtures/nanochat, adapts its stage heads (`--train heads`, so stage
K-1 stays nanochat's model) on the bundled sample prepared with its tokenizer, then decodes greedy,
batch 1 (each prompt alone), with `--mode stage --stage K-1` (the dense model: the baseline) and with
`--mode speculative --verifier dense` for every draft stage and draft length, before adapting (zero
heads: every draft is nanochat's lm_head on an early boundary) and after. For comparison the same
with the full-PoE verifier against full-PoE greedy. Per setting: tokens/s (wall clock over all
prompts, prefill included, best of `--repeats`), the speed-up over plain greedy decoding of the same
verifier and over dense greedy, acceptance (accepted / drafted), tokens per verification pass, and
whether the tokens equal that greedy decoding (they must). Also the adapted model's validation BPB
per stage and prefix. Prints tables, then one JSON line with the machine.

    python bench/nanochat.py                  # 300 adapt steps, 8 prompts x 64 tokens, fp32, one thread
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from adapt import setup  # noqa: E402
from decode import PROMPTS  # noqa: E402
from machine import describe, measure  # noqa: E402

from poegpt.engine import Sampling  # noqa: E402
from poegpt.modes import ModeSpec, run_mode  # noqa: E402


def decode(model, rows, spec, n, repeats):
    """(tokens per row, accepted, drafted, passes, best wall time) of `spec` over every row alone."""
    run_mode(model, rows[:1], spec, 4, Sampling())                       # warm-up, untimed
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        gens = [run_mode(model, [r], spec, n, Sampling()) for r in rows]
        best = min(best, time.perf_counter() - t0)
        out = gens
    tokens = [g.tokens[0] for g in out]
    return tokens, sum(g.accepted for g in out), sum(g.drafted for g in out), sum(g.passes for g in out), best


def sweep(model, rows, a, label: str) -> list[dict]:
    """For each verifier — dense (stage K-1) and poe (full PoE, for comparison) — its plain greedy
    decoding, then speculative decoding verified by it for every draft stage and draft length."""
    K = model.config.n_stages
    n = len(rows) * a.tokens
    out, t_dense = [], None
    for verifier, plain, name in (("dense", ModeSpec("stage", stage=K - 1), f"stage {K - 1} (dense)"),
                                  ("poe", ModeSpec("full"), "full PoE")):
        greedy, _, _, _, t_plain = decode(model, rows, plain, a.tokens, a.repeats)
        t_dense = t_dense or t_plain
        out.append({"model": label, "verifier": verifier, "mode": f"{name} greedy", "tok_s": n / t_plain,
                    "speedup": 1.0, "vs_dense": t_dense / t_plain, "identical": True})
        for d in range(K - 1):
            for k in (1, 3, "auto"):
                spec = ModeSpec("speculative", draft_stage=d, k_draft=k, verifier=verifier)
                tokens, accepted, drafted, passes, t = decode(model, rows, spec, a.tokens, a.repeats)
                out.append({"model": label, "verifier": verifier, "mode": f"speculative {verifier} d{d} k{k}",
                            "tok_s": n / t, "speedup": t_plain / t, "vs_dense": t_dense / t,
                            "acceptance": accepted / max(drafted, 1), "tokens_per_pass": n / max(passes, 1),
                            "identical": tokens == greedy})
    return out


def print_tables(a, machine, val, results) -> None:
    print(f"nanochat d4 (tests/fixtures/nanochat), adapted --train heads for {a.steps} steps of {a.batch_size} x "
          f"256 tokens on the bundled sample; {len(PROMPTS)} prompts x {a.tokens} new tokens, greedy, batch 1, "
          f"fp32; {describe(machine)}")
    b = val["bpb"]
    print("adapted validation BPB  stages " + " / ".join(f"{x:.3f}" for x in b["stages"])
          + "  prefixes " + " / ".join(f"{x:.3f}" for x in b["prefix"]))
    print("vs greedy: speed over plain greedy decoding of the same verifier; == greedy: the tokens equal it")
    print(f"{'model':<10}{'mode':<28}{'tok/s':>8}{'vs greedy':>10}{'vs dense':>9}{'accept':>8}{'tok/pass':>9}"
          f"{'== greedy':>10}")
    for r in results:
        print(f"{r['model']:<10}{r['mode']:<28}{r['tok_s']:>8.1f}{r['speedup']:>10.2f}{r['vs_dense']:>9.2f}"
              f"{r.get('acceptance', float('nan')):>8.2f}{r.get('tokens_per_pass', float('nan')):>9.2f}"
              f"{'yes' if r['identical'] else 'NO':>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="adapt steps")
    ap.add_argument("--batch-size", type=int, default=8, help="adapt rows per step (of 256 tokens)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from poegpt.adapt import adapt
    from poegpt.checkpoint import load_model
    machine = measure(bw=False)
    with tempfile.TemporaryDirectory() as tmp:
        imported, data = setup(Path(tmp))
        t0 = time.perf_counter()
        last = adapt(imported, data, Path(tmp) / "run", steps=a.steps, batch_size=a.batch_size, eval_every=a.steps,
                     save_every=a.steps, dtype="fp32", threads=a.threads, progress=False)
        adapt_s = time.perf_counter() - t0
        models = {"imported": load_model(imported), "adapted": load_model(Path(tmp) / "run")}
    rows = [models["imported"][1].encode(p) for p in PROMPTS]
    results = [r for label, (m, _) in models.items() for r in sweep(m, rows, a, label)]
    print_tables(a, machine, last["val"], results)
    print(json.dumps({"bench": "nanochat", "adapt_steps": a.steps, "adapt_seconds": adapt_s, "tokens": a.tokens,
                      "prompts": len(rows), "val": last["val"]["bpb"],
                      "machine": {**machine, "load_1m_end": measure(flops=False, bw=False)["load_1m"]},
                      "results": results}))


if __name__ == "__main__":
    main()
