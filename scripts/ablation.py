"""Objective ablation (docs/design.md §5): the same small model trained with each objective, equal tokens and seed.

Runs, each a resumable poegpt training run under OUT/NAME:
    residual_logop              the default objective (local_weight 0, gradients through the trunk)
    residual_logop_isolated     stage_grad = isolated (local learning: no gradient crosses a stage)
    residual_logop_local1       local_weight = 1 (each stage's own CE added)
    joint_logop                 CE of the all-stage geometric mean
    independent                 the mean of the stages' own CEs
    final_only                  the dense-GPT baseline: only the last head is trained

Then writes docs/ablation.md (full, per-stage and prefix BPB, accuracy, the agreement matrix; from
the last validation of each run) and docs/ablation_bpb.png (per-stage validation BPB over training).

    python scripts/ablation.py --data DATA --out RUNS [--steps 400] [--doc docs]

DATA is a directory written by `poegpt prepare` (the demo model's, see docs/demo_model.md).
Interrupt and rerun at will: finished runs are skipped and unfinished ones resume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RUNS = {
    "residual_logop": {},
    "residual_logop_isolated": {"stage_grad": "isolated"},
    "residual_logop_local1": {"local_weight": 1.0},
    "joint_logop": {"objective": "joint_logop"},
    "independent": {"objective": "independent"},
    "final_only": {"objective": "final_only"},
}


def run_all(data: str, out: Path, steps: int, dtype: str) -> dict[str, list[dict]]:
    from poegpt.checkpoint import checkpoints_in, read_meta
    from poegpt.train import TrainArgs, train
    history = {}
    for name, overrides in RUNS.items():
        run = out / name
        done = checkpoints_in(run) and read_meta(checkpoints_in(run)[-1]).get("step") == steps
        if not done:
            t0 = time.time()
            args = TrainArgs(data=data, out=str(run), preset="small", steps=steps, batch_size=8,
                             eval_every=max(1, steps // 8), save_every=max(1, steps // 4), eval_tokens=131_072,
                             seed=0, dtype=dtype, compile_loss=True, progress=False,
                             **{"objective": "residual_logop", **overrides})
            train(args, resume=bool(checkpoints_in(run)))
            print(f"{name}: {steps} steps in {time.time() - t0:.0f} s", flush=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        history[name] = [r for r in rows if "val" in r]
    return history


NOTES_MARKER = "<!-- notes: kept across reruns -->"


def fmt(x: float) -> str:
    return f"{x:.3f}"


def write_doc(history: dict[str, list[dict]], doc_dir: Path, steps: int, tokens: int, command: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(next(iter(history.values()))[-1]["val"]["bpb"]["stages"])
    lines = [
        "# Objective ablation",
        "",
        f"The `small` preset (8 layers as 4-2-1-1, d=128, V=4,096, context 256) trained {steps} steps "
        f"({tokens:,} tokens) with each objective, same data order and seed, bf16 autocast on CPU. "
        "BPB on the held-out validation split (the last evaluation of each run; lower is better). "
        "`prefix m` is the Log-OP of the first m stages; `full` is prefix K.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| run | full | " + " | ".join(f"stage {k}" for k in range(K)) + " | "
        + " | ".join(f"prefix {m}" for m in range(1, K)) + " | acc full |",
        "|---|---:|" + "---:|" * K + "---:|" * (K - 1) + "---:|",
    ]
    for name, evals in history.items():
        v = evals[-1]["val"]
        lines.append(f"| {name} | {fmt(v['bpb']['full'])} | " + " | ".join(fmt(b) for b in v["bpb"]["stages"])
                     + " | " + " | ".join(fmt(b) for b in v["bpb"]["prefix"][:-1])
                     + f" | {v['accuracy']['full']:.3f} |")
    lines += ["", "## Top-1 agreement between stages", "",
              "Fraction of validation tokens on which stage i's and stage j's most likely token agree.", ""]
    for name, evals in history.items():
        a = evals[-1]["val"]["agreement"]
        lines += [f"**{name}**", "", "| | " + " | ".join(f"s{j}" for j in range(K)) + " |",
                  "|---|" + "---:|" * K]
        lines += [f"| s{i} | " + " | ".join(f"{a[i][j]:.2f}" for j in range(K)) + " |" for i in range(K)]
        lines.append("")
    lines += ["## Per-stage validation BPB over training", "", "![per-stage BPB](ablation_bpb.png)", ""]
    doc = doc_dir / "ablation.md"
    # Hand-written reading of the numbers lives below NOTES_MARKER and survives a rerun.
    notes = doc.read_text(encoding="utf-8").partition(NOTES_MARKER)[2] if doc.exists() else ""
    doc.write_text("\n".join(lines) + "\n" + NOTES_MARKER + (notes or "\n"), encoding="utf-8")

    fig, axes = plt.subplots(1, len(history), figsize=(3.2 * len(history), 3.2), sharey=True)
    for ax, (name, evals) in zip(axes, history.items()):
        steps_ = [r["step"] for r in evals]
        for k in range(K):
            ax.plot(steps_, [r["val"]["bpb"]["stages"][k] for r in evals], label=f"stage {k}")
        ax.plot(steps_, [r["val"]["bpb"]["full"] for r in evals], "k--", label="full PoE")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("validation BPB")
    axes[0].legend(fontsize=7)
    lo = min(min(r["val"]["bpb"]["full"] for r in e) for e in history.values())
    axes[0].set_ylim(lo - 0.1, lo + 1.5)
    fig.tight_layout()
    fig.savefig(doc_dir / "ablation_bpb.png", dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--doc", default=str(Path(__file__).resolve().parents[1] / "docs"))
    a = ap.parse_args()
    history = run_all(a.data, Path(a.out), a.steps, a.dtype)
    tokens = a.steps * 8 * 256
    command = f"python scripts/ablation.py --data DATA --out RUNS --steps {a.steps} --dtype {a.dtype}"
    write_doc(history, Path(a.doc), a.steps, tokens, command)
    print(json.dumps({name: {"full": e[-1]["val"]["bpb"]["full"], "stages": e[-1]["val"]["bpb"]["stages"]}
                      for name, e in history.items()}))


if __name__ == "__main__":
    main()
