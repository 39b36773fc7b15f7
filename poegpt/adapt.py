"""Adapt: train the PoE stage heads of an existing model (a nanochat import) on its frozen trunk.

An imported nanochat model is dense: every additive stage head W_k is zero, so each stage predicts
with nanochat's lm_head from its own boundary, and only the last stage is any good. `adapt` trains
with the residual Log-OP objective so that every prefix PoE becomes a usable early exit and a draft
for self-speculative decoding. It is a run of the training loop (`train.train`: resume, progress,
metrics.jsonl, bpb.png, atomic checkpoints) that starts from the model's weights and trains part of it:

    heads              W_0..W_{K-2}. The shared head W_s, the last stage's W_{K-1} and the trunk are
                       frozen, so stage K-1 alone stays exactly the given model: the dense verifier of
                       `--mode speculative --verifier dense` and what `export-nanochat` writes back.
    heads+last-layers  those and the last layer of every stage (stage K-1 changes).
    all                everything, as a continued PoE training.

`stages` re-cuts the stage layout of a model whose stage heads are all zero (an import), giving zero
heads of the new count; a model with trained heads keeps its layout.
"""

from __future__ import annotations

from .train import TrainArgs, train


def adapt_args(model, data, out, stages=None, trainable: str = "heads", **train_args) -> TrainArgs:
    """The TrainArgs of an adapt run of `model` (a checkpoint or run directory) on prepared `data`."""
    return TrainArgs(data=str(data), out=str(out), preset=None, init_from=str(model),
                     stages=list(stages) if stages else None, trainable=trainable, objective="residual_logop",
                     **train_args)


def adapt(model, data, out, stages=None, trainable: str = "heads", resume: bool = False, stop_at: int | None = None,
          **train_args) -> dict:
    """Run (or resume) an adapt run; returns the last metrics row, as `train` does."""
    return train(adapt_args(model, data, out, stages, trainable, **train_args), resume=resume, stop_at=stop_at)
