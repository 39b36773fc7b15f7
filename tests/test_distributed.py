"""Data-parallel training on CPU with gloo: 2 processes equal 1 process with the same global batch."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from poegpt.checkpoint import load_model
from poegpt.train import TrainArgs, resume_args, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, kwargs: dict, resume: bool, stop_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    args = resume_args(kwargs["out"], progress=False) if resume else TrainArgs(**kwargs)
    try:
        train(args, resume=resume, stop_at=stop_at)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world: int, kwargs: dict, resume: bool = False, stop_at=None):
    mp.start_processes(_worker, args=(world, free_port(), kwargs, resume, stop_at), nprocs=world, join=True,
                       start_method="spawn")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from poegpt.data import load_mixture, prepare, read_documents
    from poegpt.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("dist")
    mixture = load_mixture("sample")
    tok = Tokenizer.train([d for s in mixture.sources for _, d in zip(range(40), read_documents(s))], 512)
    prepare(mixture, tok, root / "data")
    tok.save(root / "data")
    return root / "data"


def losses(run) -> list[float]:
    return [json.loads(l)["loss"] for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def common(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), preset="tiny", steps=4, eval_every=1000, save_every=2,
                progress=False, seed=0, case_aug_p=0.0, tokens_per_step=512,
                dtype="fp64")   # fp64: Adam's sign-like first steps turn fp32 reduction-order noise into 1e-4
    base.update(kw)
    return base


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(data_dir, tmp_path, parallel):
    torch.set_num_threads(1)
    train(TrainArgs(**common(data_dir, tmp_path / "single", batch_size=4)))
    run_ranks(2, common(data_dir, tmp_path / "pair", batch_size=2, parallel=parallel))
    single, pair = losses(tmp_path / "single"), losses(tmp_path / "pair")
    assert len(single) == len(pair) == 4
    for a, b in zip(single, pair):
        assert abs(a - b) < 1e-5, (single, pair)
    m1, _ = load_model(tmp_path / "single")
    m2, _ = load_model(tmp_path / "pair")
    for (n, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n)


def test_checkpoint_from_two_ranks_resumes_on_one(data_dir, tmp_path):
    torch.set_num_threads(1)
    train(TrainArgs(**common(data_dir, tmp_path / "single", batch_size=4)))
    run_ranks(2, common(data_dir, tmp_path / "moved", batch_size=2, parallel="fsdp"), stop_at=2)
    args = resume_args(tmp_path / "moved", progress=False)
    args.batch_size = 4                                   # same global batch on one rank
    train(args, resume=True)
    single, moved = losses(tmp_path / "single"), losses(tmp_path / "moved")
    assert len(moved) == 4
    for a, b in zip(single, moved):
        assert abs(a - b) < 1e-5, (single, moved)
