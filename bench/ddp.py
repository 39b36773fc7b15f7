"""Data-parallel step time on CPU with gloo: one process vs N ranks at the same global batch.

Each rank runs one thread, so N ranks use N cores where the single process uses one: the ratio shows
what gloo's all-reduce and the per-rank overheads cost against the ideal N× (on a real cluster the
same code runs with NCCL). Prints a table, then one JSON line.

    python bench/ddp.py --ranks 2 --steps 30 --parallel ddp
"""

from __future__ import annotations

import argparse
import json
import sys
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from poegpt.train import TrainArgs, train

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, measure as measure_machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        train(TrainArgs(**kwargs))
    finally:
        torch.distributed.destroy_process_group()


def step_seconds(run: Path, warmup: int) -> float:
    """Median seconds per step after `warmup` steps, from the tokens/s the trainer logs."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tok_s" in r and r["step"] > warmup]
    tokens_per_step = timed[0]["tokens"] / timed[0]["step"]
    secs = sorted(tokens_per_step / r["tok_s"] for r in timed)
    return secs[len(secs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared data (default: the bundled sample, prepared in a temp dir)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="global rows per step")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="poegpt-ddp-"))
    data = a.data
    if data is None:
        from poegpt.data import load_mixture, prepare, read_documents
        from poegpt.tokenizer import Tokenizer
        mixture = load_mixture("sample")
        tok = Tokenizer.train([d for s in mixture.sources for _, d in zip(range(40), read_documents(s))], 512)
        prepare(mixture, tok, tmp / "data")
        tok.save(tmp / "data")
        data = str(tmp / "data")
    common = dict(data=data, preset=a.preset, steps=a.steps, eval_every=10**9, save_every=10**9, progress=False,
                  seed=0, case_aug_p=0.0, dtype="fp32")
    torch.set_num_threads(1)
    train(TrainArgs(**common, out=str(tmp / "single"), batch_size=a.batch_size))
    mp.start_processes(_rank, args=(a.ranks, free_port(), {**common, "out": str(tmp / "ranks"),
                                                           "batch_size": a.batch_size // a.ranks,
                                                           "parallel": a.parallel}),
                       nprocs=a.ranks, join=True, start_method="spawn")
    warm = min(5, a.steps // 3)
    one, many = step_seconds(tmp / "single", warm), step_seconds(tmp / "ranks", warm)
    machine = measure_machine(flops=False, bw=False)
    print(describe(machine))
    print(f"{'setup':<28}{'s/step':>10}{'speed-up':>10}")
    print(f"{'1 process, 1 thread':<28}{one:>10.4f}{1.0:>10.2f}")
    print(f"{f'{a.ranks} gloo ranks ({a.parallel})':<28}{many:>10.4f}{one / many:>10.2f}")
    print(json.dumps({"bench": "ddp", "machine": machine, "preset": a.preset, "global_batch": a.batch_size, "ranks": a.ranks,
                      "parallel": a.parallel, "s_per_step_1": one, "s_per_step_n": many,
                      "speedup": one / many, "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
