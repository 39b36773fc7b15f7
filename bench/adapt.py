"""Adapt vs full training: tokens/s of the training loop per `--train` choice, side by side in one run.

For each model — the nanochat d4 of tests/fixtures/nanochat (imported; real nanochat weights) and a
d8 of nanochat's shape (width 512, 4 heads of 128, all-long attention, nanochat's init, the same
tokenizer; its weights do not matter for speed) — and each choice of what trains (heads,
heads+last-layers, all = full training of the same model, same objective, same batches): a few steps
of the real training loop (`poegpt.train.train` via `poegpt.adapt.adapt`, on the bundled sample
prepared with the model's tokenizer), tokens/s as the median of its steps after the first, the
trainable parameters, and the speed ratio to `all`. Prints a table, then one JSON line with the machine.

    python bench/adapt.py                     # d4 and d8, 6 steps each, fp32, one thread
    python bench/adapt.py --steps 10 --models d8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "nanochat"
CHOICES = ("heads", "heads+last-layers", "all")


def setup(root: Path) -> tuple[Path, Path]:
    """(the imported nanochat fixture, the bundled sample prepared with its tokenizer) under `root`."""
    from poegpt.data import prepare
    from poegpt.nanochat import import_nanochat
    from poegpt.tokenizer import Tokenizer
    imported = import_nanochat(FIXTURE, root / "d4")
    tok = Tokenizer.load(imported)
    prepare("sample", tok, root / "data")
    tok.save(root / "data")
    return imported, root / "data"


def nanochat_d8(root: Path, tokenizer_from: Path) -> Path:
    """A depth-8 model of nanochat's shape with nanochat's init (zero stage heads), as a checkpoint."""
    from poegpt import PoEConfig, PoEGPT
    from poegpt.checkpoint import save_checkpoint
    from poegpt.config import card_stage_layout
    from poegpt.tokenizer import Tokenizer
    cfg = PoEConfig(vocab_size=4096, n_layer=8, n_embd=512, n_head=4, n_kv_head=4, head_dim=128, sequence_len=256,
                    window_pattern="L", stage_layout=card_stage_layout(8))
    torch.manual_seed(0)
    return save_checkpoint(root / "d8", PoEGPT(cfg), Tokenizer.load(tokenizer_from))


def measure_choice(model: Path, data: Path, out: Path, which: str, a) -> dict:
    """A few adapt steps of `which`; tokens/s from the loop's own metrics.jsonl."""
    from poegpt.adapt import adapt
    from poegpt.checkpoint import load_model
    from poegpt.optim import trainable_names
    adapt(model, data, out, trainable=which, steps=a.steps, batch_size=a.batch_size, sequence_len=a.sequence_len,
          eval_every=10 ** 9, save_every=a.steps, eval_tokens=2048, dtype=a.dtype, threads=a.threads, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tok_s"] for r in rows if "tok_s" in r][1:]
    m, _ = load_model(out)
    names = trainable_names(m, which)
    trainable = sum(p.numel() for n, p in m.named_parameters() if n in names)
    return {"train": which, "tok_s": statistics.median(tok_s), "trainable_params": trainable,
            "params": m.num_params(), "steps_timed": len(tok_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["d4", "d8"], choices=["d4", "d8"], help="models to measure")
    ap.add_argument("--steps", type=int, default=6, help="training steps per choice (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per step")
    ap.add_argument("--sequence-len", type=int, default=256, help="tokens per row")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="training dtype")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = measure(bw=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        imported, data = setup(root)
        paths = {"d4": imported, "d8": nanochat_d8(root, imported) if "d8" in a.models else None}
        for name in a.models:
            rows = [measure_choice(paths[name], data, root / f"{name}-{w}", w, a) for w in CHOICES]
            full = next(r["tok_s"] for r in rows if r["train"] == "all")
            results += [{"model": name, **r, "speed_vs_all": r["tok_s"] / full} for r in rows]
    print(f"adapt vs full training: {a.steps} steps of {a.batch_size} x {a.sequence_len} tokens, {a.dtype}; "
          f"{describe(machine)}")
    print(f"{'model':<6}{'train':<20}{'trainable':>12}{'of params':>11}{'tok/s':>10}{'vs all':>8}")
    for r in results:
        print(f"{r['model']:<6}{r['train']:<20}{r['trainable_params']:>12,}{r['trainable_params'] / r['params']:>11.1%}"
              f"{r['tok_s']:>10.0f}{r['speed_vs_all']:>8.2f}")
    print(json.dumps({"bench": "adapt", "steps": a.steps, "batch_size": a.batch_size, "sequence_len": a.sequence_len,
                      "dtype": a.dtype, "machine": {**machine, "load_1m_end": measure(flops=False, bw=False)["load_1m"]},
                      "results": results}))


if __name__ == "__main__":
    main()
