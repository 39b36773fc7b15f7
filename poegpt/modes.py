"""The mode table: every inference mode of poegpt as one self-validating entry (docs/design.md, "Mode table").

A `Mode` gives a mode's name, its fields (type, default, help; the CLI's flags and the server's
request fields are made from them), how it runs (a function that yields each row's new tokens per
step), the range checks that need the model, whether it is greedy only, its `StageMix` when it is a
static mode (one token per row per step, which the server batches with every other static row),
what it reports per sequence and merged over sequences, and the configurations that show it off
(`poegpt generate --mode all`, the benches).

The CLI, the server, the scheduler, the vLLM variants and the benches all read `MODES`. Adding a
mode is one `register(Mode(...))` with a runner in its own module; nothing else changes.
`ModeSpec` is one mode's arguments, checked against its entry when made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .engine import Generation, Sampling, StageMix, decode_static, to_rows
from .errors import PoEError
from .speculative import (AUTO_DRAFTS, FALLBACKS, VERIFIERS, check_speculative_args, speculative_steps, speculator,
                          verifier_mix, warm_speculative)
from .wand import check_bounds, wand_steps

KINDS = ("int", "float", "ints", "floats", "int_or_auto", "choice")


@dataclass(frozen=True)
class Field:
    """One argument of a mode: `kind` is one of KINDS; `required` fields have no default; `finite`
    floats refuse inf (p99 bounds take +inf: "never exit here"); a "choice" is one of the strings
    `choices`. Integers are range-checked by the mode's own `check`, whose messages say the valid range."""
    name: str
    kind: str
    help: str
    default: object = None
    required: bool = False
    finite: bool = True
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value):
        """The value in its Python form (lists become tuples), or one PoEError naming the field."""
        if value is None:
            return self.default
        if self.kind == "int_or_auto":       # the CLI gives strings
            return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else value
        if self.kind == "int":
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise PoEError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "float":
            if not self._number(value):
                raise PoEError(f"{self.name} must be a finite number, got {value!r}")
            return float(value)
        if self.kind == "ints":
            if not isinstance(value, (list, tuple)):
                raise PoEError(f"{self.name} must be a list of integers, got {value!r}")
            return tuple(value)
        if not isinstance(value, (list, tuple)) or not all(self._number(v) for v in value):
            raise PoEError(f"{self.name} must be a list of {'finite ' if self.finite else ''}numbers, got {value!r}")
        return tuple(float(v) for v in value)

    def _number(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return math.isfinite(v) or (not self.finite and v == math.inf)


@dataclass(frozen=True)
class Mode:
    """One inference mode. `run(model, rows, spec, max_new_tokens, sampling, eos_token_id, gen)`
    yields each row's new tokens per step and fills `gen`; `check(spec, model)` raises on values out
    of range for the model; `mix(spec, config)` is set for static modes; `report(spec, gen, config,
    tokens)` says what the mode did for one sequence and `merge` folds reports of many;
    `examples(config, calibration)` lists (label, fields) to show the mode with (`generate --mode
    all`), `sweep` the wider set the benches measure (default: the examples). `target(spec, config)`
    is the StageMix whose distribution a mode that is not a static mix follows (its tokens' reported
    log-probs; default full PoE).

    Every mode also decodes as a row of a shared one-token step (the server's continuous batch, see
    `BatchRow`): a static mode from its mix; any other from its target, with `exit(spec, model)` the
    (bounds, safety) of an exit rule that picks the token and its stage instead of sampling (WAND), and
    `alone(spec, model, sampling)` a per-sequence object whose `cycle` runs when the row has the step to
    itself (speculative: a draft-verify cycle on the row's cache, where the cost model says it pays).
    `warm(model, rows, spec, max_new_tokens)`, where a run's compiled shapes depend on what it plans,
    compiles them all ahead (speculative: every (draft stage, length) of its plan space)."""
    name: str
    help: str
    run: Callable[..., Iterator[list[list[int]]]]
    report: Callable[..., dict]
    examples: Callable[..., list[tuple[str, dict]]]
    fields: tuple[Field, ...] = ()
    check: Callable[..., None] = lambda spec, model: None
    mix: Callable[..., StageMix] | None = None
    greedy_only: str | None = None               # why, when the mode cannot sample
    merge: Callable[[list[dict]], dict] | None = None
    sweep: Callable[..., list[tuple[str, dict]]] | None = None
    target: Callable[..., StageMix] | None = None
    exit: Callable[..., tuple] | None = None
    alone: Callable[..., object] | None = None
    warm: Callable[..., None] | None = None

    def configurations(self, config, calibration, sweep: bool = False) -> list[tuple[str, "ModeSpec"]]:
        """(label, ModeSpec) of the showcase settings, or of the bench sweep."""
        pick = self.sweep if sweep and self.sweep is not None else self.examples
        return [(label, ModeSpec(self.name, **fields)) for label, fields in pick(config, calibration)]

    @property
    def static(self) -> bool:
        """One token per row per step from a fixed StageMix (what the vLLM plugin serves)."""
        return self.mix is not None


@dataclass(frozen=True)
class BatchRow:
    """How one sequence decodes as a row of a shared one-token step: the trunk runs to `mix.depth`,
    the row's token is sampled from `mix` (its log-probs are the ones reported), or, with `exit` =
    (bounds, safety), taken by WAND's exit rule over every stage's log-probs (`wand.exit_tokens`)."""
    mix: StageMix
    exit: tuple | None = None


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    if mode.name in MODES or mode.name == "all":
        raise PoEError(f"mode {mode.name!r} is already defined")
    for f in mode.fields:
        if f.kind not in KINDS:
            raise PoEError(f"mode {mode.name!r}: field {f.name} has kind {f.kind!r}; use one of {', '.join(KINDS)}")
        if (f.kind == "choice") != bool(f.choices):
            raise PoEError(f"mode {mode.name!r}: field {f.name} needs choices exactly when its kind is 'choice'")
    MODES[mode.name] = mode
    return mode


def field_owners() -> dict[str, list[str]]:
    """Each field name -> the modes that take it."""
    owners: dict[str, list[str]] = {}
    for m in MODES.values():
        for f in m.fields:
            owners.setdefault(f.name, []).append(m.name)
    return owners


class ModeSpec:
    """A mode and its arguments, checked against the table when made (None = the field's default).
    Hashable; fields read as attributes (`spec.max_stages`)."""
    __slots__ = ("mode", "args")

    def __init__(self, mode: str = "full", **args):
        entry = MODES.get(mode) if isinstance(mode, str) else None
        if entry is None:
            raise PoEError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        names = {f.name for f in entry.fields}
        for name, value in args.items():
            if value is not None and name not in names:
                owners = field_owners().get(name)
                if owners is None:
                    raise PoEError(f"unknown mode field {name!r}; mode {mode} takes {', '.join(names) or 'none'}")
                raise PoEError(f"{name} applies to mode '{owners[0]}' only, but the mode is '{mode}'")
        values = {}
        for f in entry.fields:
            values[f.name] = f.parse(args.get(f.name))
            if f.required and values[f.name] is None:
                raise PoEError(f"{mode} mode needs {f.name}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "args", tuple(values.items()))

    def __getattr__(self, name):
        for k, v in object.__getattribute__(self, "args"):
            if k == name:
                return v
        raise AttributeError(f"mode {self.mode!r} has no field {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("ModeSpec is immutable")

    def __eq__(self, other):
        return isinstance(other, ModeSpec) and (self.mode, self.args) == (other.mode, other.args)

    def __hash__(self):
        return hash((self.mode, self.args))

    def __repr__(self):
        return f"ModeSpec({self.mode!r}" + "".join(f", {k}={v!r}" for k, v in self.args) + ")"

    @property
    def entry(self) -> Mode:
        return MODES[self.mode]

    def check(self, model) -> None:
        """Raise one PoEError if a value is out of range for this model."""
        self.entry.check(self, model)

    def stage_mix(self, model) -> StageMix:
        if self.entry.mix is None:
            raise PoEError(f"{self.mode} mode is not a static stage mix")
        return self.entry.mix(self, model.config)

    def target_mix(self, model) -> StageMix:
        """The distribution this mode's tokens follow: its stage mix, its table target, or full PoE."""
        cfg, entry = model.config, self.entry
        if entry.mix is not None:
            return entry.mix(self, cfg)
        return entry.target(self, cfg) if entry.target is not None else StageMix.full(cfg.n_stages, cfg.poe_alpha)

    def batch_row(self, model) -> BatchRow:
        """This sequence as a row of a shared one-token step (see `BatchRow`)."""
        if self.entry.exit is not None:
            return BatchRow(StageMix.full(model.config.n_stages, model.config.poe_alpha), self.entry.exit(self, model))
        return BatchRow(self.target_mix(model))


def mode_steps(model, rows: list[list[int]], spec: ModeSpec, max_new_tokens: int, sampling: Sampling = Sampling(),
               eos_token_id: int | None = None) -> tuple[Iterator[list[list[int]]], Generation]:
    """(iterator of per-row new tokens per step, the Generation that fills as it runs)."""
    entry = spec.entry
    if entry.greedy_only and not sampling.greedy:
        raise PoEError(entry.greedy_only)
    spec.check(model)
    gen = Generation([[] for _ in rows])
    return entry.run(model, rows, spec, max_new_tokens, sampling, eos_token_id, gen), gen


@torch.no_grad()
def run_mode(model, ids, spec: ModeSpec, max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_token_id: int | None = None) -> Generation:
    """Run a mode to the end: the Generation (tokens per row, and what the mode did)."""
    steps, gen = mode_steps(model, to_rows(ids), spec, max_new_tokens, sampling, eos_token_id)
    for _ in steps:
        pass
    return gen


def merge_reports(reports: list[dict]) -> dict:
    """Reports of many sequences of one mode as one (the server's request-level "poe" field)."""
    reports = [r for r in reports if r]
    if not reports:
        return {}
    entry = MODES.get(reports[0]["mode"])
    if entry is not None and entry.merge is not None:
        return entry.merge(reports)
    out = dict(reports[0])
    out["tokens"] = sum(r["tokens"] for r in reports)
    return out


# --- the static modes: a StageMix, one token per row per step ------------------------------------------

@torch.no_grad()
def static_steps(model, rows, spec: ModeSpec, max_new_tokens: int, sampling: Sampling, eos_token_id, gen: Generation):
    done = [False] * len(rows)
    for step in decode_static(model, rows, spec.stage_mix(model), max_new_tokens, sampling, eos_token_id):
        out = []
        for r, t in enumerate(step.tolist()):
            new = [] if done[r] else [t]
            done[r] = done[r] or t == eos_token_id
            gen.tokens[r].extend(new)
            out.append(new)
        yield out


def static_report(spec: ModeSpec, gen: Generation | None, config, tokens: int) -> dict:
    mix = spec.entry.mix(spec, config)
    K = len(mix.stages)
    info = {"mode": spec.mode, "n_layer": config.n_layer, "tokens": tokens, "stages": list(mix.stages),
            "stage_weights": list(mix.weights) if mix.weights is not None else [1 / K] * K,
            "layers_per_token": config.boundaries[mix.depth - 1] + 1}
    if mix.alpha:
        info["poe_alpha"] = mix.alpha
    return info


def _static(name: str, help: str, mix, examples, fields: tuple[Field, ...] = (), sweep=None) -> Mode:
    return Mode(name, help, static_steps, static_report, examples, fields,
                check=lambda spec, model: spec.stage_mix(model), mix=mix, sweep=sweep)


register(_static("full", "all stages, Log-OP of every stage",
                 lambda spec, cfg: StageMix.full(cfg.n_stages, cfg.poe_alpha),
                 lambda cfg, cal: [("full", {})]))
register(_static("prefix", "layers 0..b_{m-1} only, Log-OP of the first m stages",
                 lambda spec, cfg: StageMix.prefix(cfg.n_stages, spec.max_stages),
                 lambda cfg, cal: [(f"prefix {cfg.n_stages // 2}", {"max_stages": cfg.n_stages // 2})],
                 (Field("max_stages", "int", "how many stages", required=True),),
                 lambda cfg, cal: [(f"prefix {m}", {"max_stages": m}) for m in range(1, cfg.n_stages)]))
register(_static("stage", "layers 0..b_k, stage k's own head",
                 lambda spec, cfg: StageMix.single(cfg.n_stages, spec.stage),
                 lambda cfg, cal: [("stage 0", {"stage": 0})],
                 (Field("stage", "int", "which stage", required=True),),
                 lambda cfg, cal: [("stage 0", {"stage": 0}), (f"stage {cfg.n_stages - 1} (dense)",
                                                               {"stage": cfg.n_stages - 1})]))
register(_static("composition", "to the deepest selected boundary, weighted Log-OP of the selected stages",
                 lambda spec, cfg: StageMix.composition(cfg.n_stages, spec.stages, spec.stage_weights),
                 lambda cfg, cal: [(f"composition {list(range(0, cfg.n_stages, 2))}",
                                    {"stages": tuple(range(0, cfg.n_stages, 2))})],
                 (Field("stages", "ints", "the stages to combine", required=True),
                  Field("stage_weights", "floats", "their Log-OP weights (default uniform)"))))


# --- WAND: adaptive depth ------------------------------------------------------------------------------

def wand_bounds(spec: ModeSpec, model) -> list[float]:
    """The given bounds, else the checkpoint's calibrated ones (the one place calibration is read)."""
    bounds = spec.p99_bounds if spec.p99_bounds is not None else model.calibration.wand_p99_bounds
    return check_bounds(model.config.n_stages, spec.safety, bounds)


def _wand_run(model, rows, spec, max_new_tokens, sampling, eos_token_id, gen):
    return wand_steps(model, rows, max_new_tokens, spec.safety, wand_bounds(spec, model), eos_token_id, gen)


def _wand_report(spec, gen, config, tokens: int) -> dict:
    b = config.boundaries
    used = gen.stages_used[0][:tokens] if gen is not None and gen.stages_used else []
    return {"mode": "wand", "n_layer": config.n_layer, "tokens": tokens, "safety": spec.safety, "stages_used": used,
            "mean_stages_per_token": sum(u + 1 for u in used) / max(len(used), 1),
            "mean_layers_per_token": sum(b[u] + 1 for u in used) / max(len(used), 1)}


def _wand_merge(reports: list[dict]) -> dict:
    out = {k: v for k, v in reports[0].items() if k != "stages_used"}
    out["tokens"] = tokens = sum(r["tokens"] for r in reports)
    for key in ("mean_stages_per_token", "mean_layers_per_token"):
        out[key] = sum(r[key] * r["tokens"] for r in reports) / max(tokens, 1)
    return out


def _wand_examples(cfg, calibration) -> list[tuple[str, dict]]:
    if calibration.wand_p99_bounds is not None:
        return [("wand safety 1", {})]
    return [("wand (no calibration: inf bounds)", {"p99_bounds": (math.inf,) * (cfg.n_stages - 1)})]


def _wand_sweep(cfg, calibration) -> list[tuple[str, dict]]:
    """Calibrated (when it is), and with infinite bounds: never exits early, so it checks the accounting."""
    inf = [("wand (inf bounds)", {"p99_bounds": (math.inf,) * (cfg.n_stages - 1)})]
    return ([("wand safety 1", {})] if calibration.wand_p99_bounds is not None else []) + inf


register(Mode("wand", "stage by stage until the margin beats the calibrated bound (greedy)", _wand_run,
              _wand_report, _wand_examples,
              (Field("safety", "float", "bound multiplier (higher = deeper)", default=1.0),
               Field("p99_bounds", "floats", "per-stage bounds (default: the checkpoint's calibration)", finite=False)),
              check=lambda spec, model: wand_bounds(spec, model),
              greedy_only="WAND mode is greedy (its exit rule bounds the argmax); drop temperature/do_sample",
              merge=_wand_merge, sweep=_wand_sweep,
              exit=lambda spec, model: (tuple(wand_bounds(spec, model)), spec.safety)))


# --- self-speculative decoding ---------------------------------------------------------------------------

def _speculative_run(model, rows, spec, max_new_tokens, sampling, eos_token_id, gen):
    return speculative_steps(model, rows, spec.draft_stage, spec.k_draft, max_new_tokens, sampling, eos_token_id,
                             gen, spec.verifier, spec.fallback)


def _speculative_alone(spec, model, sampling):
    """The cycles a speculative row runs when it has the shared step to itself (None: it decodes plainly)."""
    return speculator(model, spec.draft_stage, spec.k_draft, sampling, spec.verifier, spec.fallback)


def _speculative_report(spec, gen, config, tokens: int) -> dict:
    drafted, accepted, passes = (gen.drafted, gen.accepted, gen.passes) if gen is not None else (0, 0, 0)
    plain = gen.extra.get("plain_steps", 0) if gen is not None else 0
    return {"mode": "speculative", "n_layer": config.n_layer, "tokens": tokens, "draft_stage": spec.draft_stage,
            "k_draft": spec.k_draft, "verifier": spec.verifier, "fallback": spec.fallback,
            "acceptance_rate": accepted / drafted if drafted else 0.0, "drafted": drafted, "accepted": accepted,
            "passes": passes, "plain_steps": plain, "tokens_per_pass": tokens / max(passes, 1)}


def _speculative_merge(reports: list[dict]) -> dict:
    out = dict(reports[0])
    out["tokens"] = tokens = sum(r["tokens"] for r in reports)
    for key in ("drafted", "accepted", "passes", "plain_steps"):
        out[key] = sum(r[key] for r in reports)
    out["acceptance_rate"] = out["accepted"] / out["drafted"] if out["drafted"] else 0.0
    out["tokens_per_pass"] = tokens / max(out["passes"], 1)
    return out


register(Mode("speculative", "stages <= d draft, the rest verifies in one pass (output = full PoE, or the "
                             "last stage alone with verifier dense); plain steps where drafting would not pay",
              _speculative_run, _speculative_report,
              lambda cfg, cal: [("speculative auto", {"draft_stage": "auto", "k_draft": "auto"})],
              (Field("draft_stage", "int_or_auto", "last draft stage, or auto (chosen by the cost model)", default=0),
               Field("k_draft", "int_or_auto", f"draft length, or auto (one of {', '.join(map(str, AUTO_DRAFTS))}, "
                     "chosen by the cost model)", default=3),
               Field("verifier", "choice", "what verifies and so what the output follows: poe (full PoE) or dense "
                     "(the last stage alone: an imported nanochat model)", default="poe", choices=VERIFIERS),
               Field("fallback", "choice", "auto: a plain step of the verifier whenever the measured pass costs say "
                     "drafting would not pay; never: always draft", default="auto", choices=FALLBACKS)),
              check=lambda spec, model: check_speculative_args(model.config.n_stages, spec.draft_stage, spec.k_draft,
                                                               spec.verifier, spec.fallback),
              merge=_speculative_merge,
              target=lambda spec, cfg: verifier_mix(cfg.n_stages, spec.verifier, cfg.poe_alpha),
              alone=_speculative_alone,
              warm=lambda model, rows, spec, n: warm_speculative(model, rows, spec.draft_stage, spec.k_draft, n,
                                                                 spec.verifier),
              sweep=lambda cfg, cal: [(f"speculative d{d} k{k}", {"draft_stage": d, "k_draft": k})
                                      for d in range(cfg.n_stages - 1) for k in (3, "auto")]
              + [("speculative auto", {"draft_stage": "auto", "k_draft": "auto"})]))
