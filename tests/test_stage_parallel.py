"""Stage parallelism on CPU with gloo: one rank per stage (4 ranks for the tiny preset).

Training with stage_grad="isolated" equals single-process isolated training; stage-parallel
composition decoding equals single-process generate_parallel_composition, tokens and log-probs."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from poegpt.checkpoint import load_model
from poegpt.config import PoEConfig
from poegpt.engine import StageMix
from poegpt.errors import PoEError
from poegpt.train import TrainArgs, train
from tests.conftest import build_random_model
from tests.test_distributed import common, data_dir, free_port, losses, run_ranks  # noqa: F401 (fixture)

K = PoEConfig.from_preset("tiny").n_stages


@pytest.mark.parametrize("objective", ["residual_logop", "independent"])
def test_stage_parallel_training_equals_single_process_isolated(data_dir, tmp_path, objective):
    torch.set_num_threads(1)
    kw = dict(batch_size=4, objective=objective, stage_grad="isolated", local_weight=0.25, steps=3, save_every=3)
    train(TrainArgs(**common(data_dir, tmp_path / "single", **kw)))
    run_ranks(K, common(data_dir, tmp_path / "staged", parallel="stage", **kw))
    single, staged = losses(tmp_path / "single"), losses(tmp_path / "staged")
    assert len(single) == len(staged) == 3
    for a, b in zip(single, staged):
        assert abs(a - b) < 1e-5, (single, staged)
    m1, _ = load_model(tmp_path / "single")
    m2, _ = load_model(tmp_path / "staged")
    moved = 0
    init = build_init(m1.config)
    for (n, p1), (_, p2), (_, p0) in zip(m1.state_dict().items(), m2.state_dict().items(), init.items()):
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-5, msg=n)
        moved += not torch.equal(p1, p0)
    assert moved > 0.5 * len(init)   # training changed most tensors, so equality is not vacuous


def build_init(cfg: PoEConfig) -> dict:
    from poegpt.model import PoEModel as PoEGPT
    torch.manual_seed(0)   # as train() builds its model (seed=0)
    return PoEGPT(cfg).double().state_dict()


def test_stage_parallel_rejects_a_wrong_setup(data_dir, tmp_path):
    with pytest.raises(Exception) as e:   # through-gradients cross stages: not stage-parallel trainable
        run_ranks(K, common(data_dir, tmp_path / "bad", batch_size=4, parallel="stage", steps=1))
    assert "isolated" in str(e.value)


def _compose_worker(rank: int, world: int, port: int, kwargs: dict, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from poegpt.stage_parallel import generate_composition
        model = build_random_model(seed=3, dtype=torch.float64)
        new, logps = generate_composition(model, **kwargs)
        if rank == 0:
            torch.save({"new": new, "logps": torch.stack(logps)}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stages,weights", [([0, 1, 2, 3], None), ([1, 3], [0.3, 0.7]), ([2], None)])
def test_stage_parallel_composition_equals_single_process(tmp_path, stages, weights):
    ids = [[5, 9, 2, 7, 1], [3, 3, 8, 4, 6]]
    kwargs = dict(ids=ids, stages=stages, stage_weights=weights, max_new_tokens=6)
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_compose_worker, args=(K, free_port(), kwargs, out), nprocs=K, join=True,
                       start_method="spawn")
    got = torch.load(out, weights_only=True)
    model = build_random_model(seed=3, dtype=torch.float64)
    ref = model.generate_parallel_composition(torch.tensor(ids), stages, weights, max_new_tokens=6)
    assert got["new"] == ref[:, len(ids[0]):].tolist()
    # log-probs of each step from a no-cache forward over the generated prefix
    mix = StageMix.composition(K, stages, weights)
    for t in range(6):
        hs = model.trunk(ref[:, :len(ids[0]) + t])
        torch.testing.assert_close(got["logps"][t], mix.logprobs(model, [h[:, -1] for h in hs]),
                                   rtol=1e-9, atol=1e-9)


def test_stage_parallel_inference_needs_one_rank_per_stage():
    from poegpt.stage_parallel import generate_composition
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(PoEError, match="one rank per stage"):
            generate_composition(build_random_model(), [[1, 2]], [0, 1])
    finally:
        torch.distributed.destroy_process_group()
