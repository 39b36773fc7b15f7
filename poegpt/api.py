"""PoEGPT: the model with the model card's methods, named and called as the card names them.

`PoEGPT` is `PoEModel` (the network, `model.py`) plus seven thin wrappers over the mode table
(`modes.py`): `generate` (full PoE), `generate_prefix`, `forward_stage` (inherited), `generate_stage`,
`generate_wand`, `generate_speculative` and `generate_parallel_composition`. They add no parameters,
so state_dict keys and checkpoints are the model's. Each returns HF-style ids (prompt then new
tokens); what a mode did (stages used, acceptance) comes back as a return value when asked for.
"""

from __future__ import annotations

import torch

from .engine import Sampling, as_output
from .model import PoEModel
from .modes import ModeSpec, run_mode


class PoEGPT(PoEModel):

    def _run(self, ids, spec: ModeSpec, max_new_tokens: int, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, seed=None, eos_token_id=None):
        gen = run_mode(self, ids, spec, max_new_tokens, Sampling(do_sample, temperature, top_k, top_p, seed),
                       eos_token_id)
        return as_output(ids, gen, eos_token_id), gen

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Full PoE: all stages, Log-OP. (B, T) prompt ids -> (B, T + new) ids, like HF's generate.
        Prompts of different lengths may be given as a list of lists; rows are right-padded with EOS."""
        return self._run(ids, ModeSpec("full"), max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                         eos_token_id)[0]

    def generate_prefix(self, ids, max_stages: int, max_new_tokens: int = 32, **sampling) -> torch.Tensor:
        """Prefix PoE of the first max_stages stages; runs layers 0..b_{max_stages-1} only."""
        return self._run(ids, ModeSpec("prefix", max_stages=max_stages), max_new_tokens, **sampling)[0]

    def generate_stage(self, ids, stage: int, max_new_tokens: int = 32, **sampling) -> torch.Tensor:
        """One stage's own head as the predictor; runs layers 0..b_stage only."""
        return self._run(ids, ModeSpec("stage", stage=stage), max_new_tokens, **sampling)[0]

    def generate_parallel_composition(self, ids, stages, stage_weights=None, max_new_tokens: int = 32,
                                      **sampling) -> torch.Tensor:
        """Weighted Log-OP of the selected stages; one pass to the deepest selected boundary."""
        spec = ModeSpec("composition", stages=_seq(stages), stage_weights=_seq(stage_weights))
        return self._run(ids, spec, max_new_tokens, **sampling)[0]

    def generate_wand(self, ids, max_new_tokens: int = 32, safety: float = 1.0, p99_bounds=None,
                      return_stages_used: bool = False, eos_token_id: int | None = None):
        """Adaptive depth (greedy): each token exits at the first stage whose margin beats the bound.
        Returns ids, or (ids, stages_used) with stages_used[b][i] the stage that emitted token i."""
        spec = ModeSpec("wand", safety=safety, p99_bounds=_seq(p99_bounds))
        out, gen = self._run(ids, spec, max_new_tokens, eos_token_id=eos_token_id)
        return (out, gen.stages_used) if return_stages_used else out

    def generate_speculative(self, ids, draft_stage: int | str = 0, k_draft: int | str = 3, max_new_tokens: int = 32,
                             return_acceptance: bool = False, do_sample: bool = False, temperature: float = 1.0,
                             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                             eos_token_id: int | None = None, verifier: str = "poe", fallback: str = "auto"):
        """Self-speculative decoding: stages 0..draft_stage draft k_draft tokens, the rest verifies
        ("auto" for either: chosen by the cost model; fallback="auto" takes a plain step where drafting
        would not pay, "never" always drafts). Greedy output equals full-PoE greedy, or with
        verifier="dense" stage K-1's greedy (`generate_stage(ids, K-1)`); sampling follows that
        distribution exactly. Returns ids, or (ids, acceptance rate) with return_acceptance."""
        spec = ModeSpec("speculative", draft_stage=draft_stage, k_draft=k_draft, verifier=verifier, fallback=fallback)
        out, gen = self._run(ids, spec, max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id)
        return (out, gen.acceptance) if return_acceptance else out


def _seq(values):
    """A list, tuple or 1-D tensor of values as a tuple (None stays None)."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return tuple(values.tolist())
    return tuple(values) if isinstance(values, (list, tuple)) else values
