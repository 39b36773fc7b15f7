"""The six inference modes behind one description, for the CLI, the server and the benchmarks.

A `ModeSpec` names a mode and its arguments; `mode_steps` runs it and yields, at every step, the
new tokens of each row (a list per row, possibly empty, possibly several tokens for speculative
decoding), while a `Generation` collects the tokens and what the mode did (stages used per token,
acceptance). Argument checking is the modes' own, so errors name the argument the user gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .engine import Generation, Sampling, StageMix, decode_static
from .errors import PoEError

MODES = ("full", "prefix", "stage", "wand", "speculative", "composition")


@dataclass(frozen=True)
class ModeSpec:
    mode: str = "full"
    max_stages: int | None = None          # prefix
    stage: int | None = None               # stage
    stages: tuple[int, ...] | None = None  # composition
    stage_weights: tuple[float, ...] | None = None
    safety: float = 1.0                    # wand
    p99_bounds: tuple[float, ...] | None = None
    draft_stage: int = 0                   # speculative
    k_draft: int | str = 3

    def __post_init__(self):
        if self.mode not in MODES:
            raise PoEError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")

    def stage_mix(self, model) -> StageMix:
        K, cfg = model.config.n_stages, model.config
        if self.mode == "full":
            return StageMix.full(K, cfg.poe_alpha)
        if self.mode == "prefix":
            if self.max_stages is None:
                raise PoEError("prefix mode needs max_stages")
            return StageMix.prefix(K, self.max_stages)
        if self.mode == "stage":
            if self.stage is None:
                raise PoEError("stage mode needs stage")
            return StageMix.single(K, self.stage)
        return StageMix.composition(K, self.stages, self.stage_weights)


@torch.no_grad()
def static_steps(model, rows, mix: StageMix, max_new_tokens: int, sampling: Sampling, eos_token_id, gen: Generation):
    gen.tokens = [[] for _ in rows]
    done = [False] * len(rows)
    for step in decode_static(model, rows, mix, max_new_tokens, sampling, eos_token_id):
        out = []
        for r, t in enumerate(step.tolist()):
            new = [] if done[r] else [t]
            done[r] = done[r] or t == eos_token_id
            gen.tokens[r].extend(new)
            out.append(new)
        yield out


def mode_steps(model, rows: list[list[int]], spec: ModeSpec, max_new_tokens: int, sampling: Sampling = Sampling(),
               eos_token_id: int | None = None) -> tuple[Iterator[list[list[int]]], Generation]:
    """(iterator of per-row new tokens per step, the Generation that fills as it runs)."""
    gen = Generation([[] for _ in rows])
    if spec.mode == "wand":
        if not sampling.greedy:
            raise PoEError("WAND mode is greedy (its exit rule bounds the argmax); drop temperature/do_sample")
        from .wand import wand_steps
        bounds = None if spec.p99_bounds is None else list(spec.p99_bounds)
        return wand_steps(model, rows, max_new_tokens, spec.safety, bounds, eos_token_id, gen), gen
    if spec.mode == "speculative":
        from .speculative import speculative_steps
        return speculative_steps(model, rows, spec.draft_stage, spec.k_draft, max_new_tokens, sampling,
                                 eos_token_id, None, gen), gen
    return static_steps(model, rows, spec.stage_mix(model), max_new_tokens, sampling, eos_token_id, gen), gen
