"""Evaluation: every metric of the card's table (docs/design.md §11.1), as JSON + CSV + PNG under `eval/`.

On a validation token stream of BOS-prefixed documents:
    BPB = Σ −log₂ p(target) / Σ UTF-8 bytes of the targets (special-token targets excluded)
for full PoE (geometric mean), entropy-weighted PoE (α = 1 unless told), each stage alone and each
prefix PoE; next-token accuracy (full and per stage); the K×K top-1 agreement matrix; and prompt
target ranks, full PoE vs the shared head alone on the last boundary, with wins/ties/losses.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import PoEError
from .logop import logop


@torch.no_grad()
def stream_metrics(model, batches, token_bytes: torch.Tensor, alpha: float = 1.0, chunk: int = 1024) -> dict:
    """Accumulate the §7 stream metrics over (inputs, targets) batches."""
    K = model.config.n_stages
    tb = token_bytes.to(torch.long)
    nats = {"full": 0.0, "entropy_weighted": 0.0, **{f"stage_{k}": 0.0 for k in range(K)},
            **{f"prefix_{m}": 0.0 for m in range(1, K + 1)}}
    correct = torch.zeros(K + 1, dtype=torch.long)
    agree = torch.zeros(K, K, dtype=torch.long)
    n_bytes = n_tokens = 0
    for x, y in batches:
        hs = [h.flatten(0, 1) for h in model.trunk(x)]
        y = y.flatten()
        for s in range(0, y.numel(), chunk):
            yc = y[s:s + chunk]
            keep = (yc >= 0) & (tb[yc.clamp(min=0)] > 0)
            if not keep.any():
                continue
            yk = yc[keep]
            logps = [F.log_softmax(model.stage_logits(h[s:s + chunk][keep], k), -1) for k, h in enumerate(hs)]

            def nll(lp):
                return -lp.gather(-1, yk[:, None]).sum().item()
            for k in range(K):
                nats[f"stage_{k}"] += nll(logps[k])
            for m in range(1, K + 1):
                nats[f"prefix_{m}"] += nll(logop(logps[:m]))
            nats["entropy_weighted"] += nll(logop(logps, alpha=alpha))
            tops = torch.stack([lp.argmax(-1) for lp in logps])            # (K, n)
            full_top = logop(logps).argmax(-1)
            correct[:K] += (tops == yk).sum(-1)
            correct[K] += (full_top == yk).sum()
            agree += (tops[:, None, :] == tops[None, :, :]).sum(-1)
            n_bytes += tb[yk].sum().item()
            n_tokens += yk.numel()
    if n_tokens == 0:
        raise PoEError("the evaluation stream has no scorable tokens; check the validation data")
    nats["full"] = nats[f"prefix_{K}"]
    bpb = {k: v / math.log(2) / n_bytes for k, v in nats.items()}
    return {
        "tokens": n_tokens, "bytes": n_bytes, "entropy_alpha": alpha,
        "bpb": {"full": bpb["full"], "entropy_weighted": bpb["entropy_weighted"],
                "stages": [bpb[f"stage_{k}"] for k in range(K)],
                "prefix": [bpb[f"prefix_{m}"] for m in range(1, K + 1)]},
        "accuracy": {"full": correct[K].item() / n_tokens, "stages": [c / n_tokens for c in correct[:K].tolist()]},
        "agreement": (agree.double() / n_tokens).tolist(),
    }


def load_prompt_targets(path) -> list[tuple[str, str]]:
    """JSONL of {"prompt": ..., "target": ...}: the target's first token is the expected next token."""
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PoEError(f"prompt file {path} does not exist") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            pairs.append((str(d["prompt"]), str(d["target"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PoEError(f"{path}:{n}: each line must be a JSON object with 'prompt' and 'target'") from None
    if not pairs:
        raise PoEError(f"prompt file {path} has no prompts")
    return pairs


@torch.no_grad()
def prompt_target_ranks(model, tokenizer, pairs: list[tuple[str, str]]) -> dict:
    """Rank (1 = top) of each target token under full PoE and under the shared head alone."""
    rows, wins, ties, losses = [], 0, 0, 0
    for prompt, target in pairs:
        target_ids = tokenizer.encode(target, add_special_tokens=False)
        if not target_ids:
            raise PoEError(f"target {target!r} encodes to no token")
        ids = torch.tensor([tokenizer.encode(prompt)], device=model.rope_cos.device)
        hs = [h[0, -1] for h in model.trunk(ids)]
        full = logop([F.log_softmax(model.stage_logits(h, k), -1) for k, h in enumerate(hs)])
        shared = model.shared_logits(hs[-1])
        t = target_ids[0]
        r_full = int((full > full[t]).sum()) + 1
        r_shared = int((shared > shared[t]).sum()) + 1
        wins += r_full < r_shared
        ties += r_full == r_shared
        losses += r_full > r_shared
        rows.append({"prompt": prompt, "target": target, "target_token": tokenizer.decode([t]),
                     "rank_full": r_full, "rank_shared": r_shared})
    n = len(rows)
    return {"mean_rank_full": sum(r["rank_full"] for r in rows) / n,
            "mean_rank_shared": sum(r["rank_shared"] for r in rows) / n,
            "wins": wins, "ties": ties, "losses": losses, "prompts": rows}


def write_report(report: dict, out_dir) -> Path:
    """eval/report.json, eval/metrics.csv, eval/stage_bpb.png, eval/agreement.png (+ prompt_ranks.csv)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    m = report["metrics"]
    K = len(m["bpb"]["stages"])
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        w.writerow(["full_bpb", m["bpb"]["full"]])
        w.writerow([f"entropy_weighted_bpb_alpha{m['entropy_alpha']}", m["bpb"]["entropy_weighted"]])
        w.writerow(["full_accuracy", m["accuracy"]["full"]])
        for k in range(K):
            w.writerow([f"stage{k}_bpb", m["bpb"]["stages"][k]])
            w.writerow([f"prefix{k + 1}_bpb", m["bpb"]["prefix"][k]])
            w.writerow([f"stage{k}_accuracy", m["accuracy"]["stages"][k]])
        for i in range(K):
            for j in range(i + 1, K):
                w.writerow([f"agreement_s{i}_s{j}", m["agreement"][i][j]])
        if "prompt_ranks" in report:
            pr = report["prompt_ranks"]
            w.writerow(["prompt_mean_rank_full", pr["mean_rank_full"]])
            w.writerow(["prompt_mean_rank_shared", pr["mean_rank_shared"]])
            w.writerow(["prompt_wins_ties_losses", f"{pr['wins']}/{pr['ties']}/{pr['losses']}"])
    if "prompt_ranks" in report:
        with open(out / "prompt_ranks.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "target", "target_token", "rank_full", "rank_shared"])
            w.writeheader()
            w.writerows(report["prompt_ranks"]["prompts"])

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"s{k}" for k in range(K)] + [f"s0..s{k}" for k in range(1, K)] + ["entropy-w."]
    values = m["bpb"]["stages"] + m["bpb"]["prefix"][1:] + [m["bpb"]["entropy_weighted"]]
    colors = ["tab:blue"] * K + ["tab:orange"] * (K - 1) + ["tab:green"]
    ax.bar(labels, values, color=colors)
    lo = min(values)
    ax.set_ylim(lo * 0.97, max(values) * 1.01)
    ax.set_ylabel("validation BPB (lower is better)")
    ax.set_title(f"Per-stage and prefix-PoE BPB (full PoE = s0..s{K - 1}: {m['bpb']['full']:.4f})")
    fig.tight_layout()
    fig.savefig(out / "stage_bpb.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(m["agreement"], vmin=0, vmax=1, cmap="viridis")
    for i in range(K):
        for j in range(K):
            ax.text(j, i, f"{m['agreement'][i][j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(K), [f"s{k}" for k in range(K)])
    ax.set_yticks(range(K), [f"s{k}" for k in range(K)])
    ax.set_title("stage top-1 agreement")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(out / "agreement.png", dpi=120)
    plt.close(fig)
    return out
