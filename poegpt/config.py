"""The one config dataclass of a PoE GPT, its presets and the depth dial.

`PoEConfig` holds every architecture field plus the few training-objective fields that travel with
a checkpoint (objective, local_weight, stage_grad, poe_alpha). It is frozen, validates itself on
construction (every bad value is a `PoEError` naming the field), and round-trips through JSON.

Presets:
    tiny  - unit tests: 8 layers as (4, 2, 1, 1), d=64, GQA 4/2, SSSL, < 1M parameters
    1.5b  - the model card's architecture: 24 layers as (12, 5, 4, 3), d=1536, 12/6 heads of 128,
            V=48,000, context 2,048; exactly 1,507,591,082 parameters
    demo  - the shipped default model: 8 layers as (4, 2, 1, 1), d=256, GQA 4/2 heads of 64, V=4,096,
            context 512, SSSL; 14.2M parameters (docs/demo_model.md)
    small - the demo's shape at d=128 and context 256, for objective ablations (docs/ablation.md)

`PoEConfig.from_depth(n)` is nanochat's depth dial: width 64·n rounded up to whole heads of 128
(64 when narrower than 512), KV heads the largest proper divisor of the head count (GQA), and a stage layout in the card's proportions 12:5:4:3.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PoEError

OBJECTIVES = ("residual_logop", "joint_logop", "independent", "final_only")
STAGE_GRADS = ("through", "isolated")
CARD_STAGE_FRACTIONS = (12 / 24, 17 / 24, 21 / 24, 24 / 24)  # cumulative boundaries of (12, 5, 4, 3)


@dataclass(frozen=True)
class PoEConfig:
    vocab_size: int = 48_000
    n_layer: int = 24
    n_embd: int = 1536
    n_head: int = 12
    n_kv_head: int = 6
    head_dim: int = 128
    sequence_len: int = 2048
    window_pattern: str = "SSSL"
    stage_layout: tuple[int, ...] = (12, 5, 4, 3)
    softcap: float = 15.0
    value_embeds: bool = True
    rope_base: float = 100_000.0
    poe_alpha: float = 0.0
    objective: str = "residual_logop"
    local_weight: float = 0.0
    stage_grad: str = "through"
    router: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # free-form metadata (e.g. preset name)

    def __post_init__(self):
        object.__setattr__(self, "stage_layout", tuple(int(s) for s in self.stage_layout))
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "sequence_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PoEError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise PoEError(f"config: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise PoEError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise PoEError(f"config: window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
        if not self.stage_layout or any(s < 1 for s in self.stage_layout):
            raise PoEError(f"config: stage_layout must be positive layer counts, got {list(self.stage_layout)}")
        if sum(self.stage_layout) != self.n_layer:
            raise PoEError(f"config: stage_layout {list(self.stage_layout)} sums to {sum(self.stage_layout)}, "
                           f"but n_layer is {self.n_layer}; make them agree")
        if not (self.softcap > 0):
            raise PoEError(f"config: softcap must be > 0, got {self.softcap}")
        if self.objective not in OBJECTIVES:
            raise PoEError(f"config: unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.stage_grad not in STAGE_GRADS:
            raise PoEError(f"config: stage_grad must be one of {', '.join(STAGE_GRADS)}, got {self.stage_grad!r}")
        if not (self.local_weight >= 0):
            raise PoEError(f"config: local_weight must be >= 0, got {self.local_weight}")
        if not (self.poe_alpha >= 0):
            raise PoEError(f"config: poe_alpha must be >= 0, got {self.poe_alpha}")
        if self.router not in (None, "disabled"):
            raise PoEError(f"config: router must be null or 'disabled' (the card's router is off), got {self.router!r}")

    # --- derived quantities -------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.stage_layout)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Index of the last layer of each stage: (11, 16, 20, 23) for (12, 5, 4, 3)."""
        return tuple(sum(self.stage_layout[: k + 1]) - 1 for k in range(self.n_stages))

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 64) * 64

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2

    @property
    def short_window(self) -> int:
        """A quarter of the context, rounded up to a multiple of 128 (of itself when smaller)."""
        quarter = math.ceil(self.sequence_len / 4)
        step = min(128, quarter)
        return math.ceil(quarter / step) * step

    @property
    def windows(self) -> tuple[int, ...]:
        """Per-layer attention window w: a query at t sees keys t-w .. t. The last layer is long."""
        pattern = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.n_layer)]
        pattern[-1] = "L"
        return tuple(self.sequence_len if c == "L" else self.short_window for c in pattern)

    def has_value_embed(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    def stage_of_layer(self, layer: int) -> int:
        return next(k for k, b in enumerate(self.boundaries) if layer <= b)

    # --- construction -------------------------------------------------------------------------
    def replace(self, **changes) -> "PoEConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PoEConfig":
        if name not in PRESETS:
            raise PoEError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]()
        extra = {**cfg.extra, "preset": name}
        return cfg.replace(extra=extra, **overrides) if overrides else cfg.replace(extra=extra)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 48_000, sequence_len: int = 2048, **overrides) -> "PoEConfig":
        if not isinstance(depth, int) or depth < 4:
            raise PoEError(f"depth must be an integer >= 4 (one layer per stage at least), got {depth!r}")
        head_dim = 128 if 64 * depth >= 512 else 64
        n_embd = math.ceil(64 * depth / head_dim) * head_dim   # aspect ratio 64, whole heads
        n_head = n_embd // head_dim
        n_kv_head = max(g for g in range(1, n_head) if n_head % g == 0) if n_head > 1 else 1  # GQA
        cfg = dict(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                   head_dim=head_dim, sequence_len=sequence_len, stage_layout=card_stage_layout(depth),
                   extra={"depth": depth})
        cfg.update(overrides)
        return cls(**cfg)

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_layout"] = list(self.stage_layout)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PoEConfig":
        if not isinstance(d, dict):
            raise PoEError(f"config: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PoEError(f"config: unknown field(s) {', '.join(unknown)}; is this a poegpt config.json?")
        try:
            return cls(**d)
        except TypeError as e:
            raise PoEError(f"config: {e}") from None

    @classmethod
    def load(cls, path) -> "PoEConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PoEError(f"no config at {path}; point to a checkpoint directory or a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PoEError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
        return cls.from_dict(d)


def parse_layout(text: str | None) -> tuple[int, ...] | None:
    """A stage layout from its command-line form "12,5,4,3" (None stays None)."""
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise PoEError(f"--stages must be comma-separated layer counts, e.g. 12,5,4,3; got {text!r}") from None


def card_stage_layout(n_layer: int) -> tuple[int, ...]:
    """Stage layout in the card's proportions (12:5:4:3 of 24), at least one layer per stage."""
    bounds, prev = [], 0
    for i, frac in enumerate(CARD_STAGE_FRACTIONS):
        remaining_stages = len(CARD_STAGE_FRACTIONS) - i - 1
        b = min(max(round(frac * n_layer), prev + 1), n_layer - remaining_stages)
        bounds.append(b)
        prev = b
    return tuple(b - a for a, b in zip([0] + bounds[:-1], bounds))


def _tiny() -> PoEConfig:
    return PoEConfig(vocab_size=512, n_layer=8, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                     sequence_len=64, stage_layout=(4, 2, 1, 1))


def _demo() -> PoEConfig:
    """The shipped demo model: the card's trunk and stage proportions at 8 layers (4-2-1-1), head_dim 64
    (vLLM's CPU attention supports it), a 4,096-token vocabulary. The size that trains the most bytes
    per second on a 2-core CPU (bf16 autocast, compiled loss): see docs/demo_model.md."""
    return PoEConfig(vocab_size=4096, n_layer=8, n_embd=256, n_head=4, n_kv_head=2, head_dim=64,
                     sequence_len=512, stage_layout=(4, 2, 1, 1))


def _small() -> PoEConfig:
    """The demo's shape at half the width and context, for objective ablations (docs/ablation.md)."""
    return PoEConfig(vocab_size=4096, n_layer=8, n_embd=128, n_head=2, n_kv_head=1, head_dim=64,
                     sequence_len=256, stage_layout=(4, 2, 1, 1))


def _card_1_5b() -> PoEConfig:
    return PoEConfig.from_depth(24, vocab_size=48_000, sequence_len=2048)


PRESETS = {"tiny": _tiny, "small": _small, "demo": _demo, "1.5b": _card_1_5b}


@dataclass(frozen=True)
class Calibration:
    """What `poegpt calibrate` measured on a checkpoint, stored in its meta.json["calibration"]:
    WAND's p99 bounds (one per stage but the last), read by the mode table, and per draft stage how
    often its prefix PoE has the full-PoE argmax, the speculative planner's prior acceptance."""
    wand_p99_bounds: tuple[float, ...] | None = None
    speculative_agreement: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_meta(cls, calibration: dict | None) -> "Calibration":
        c = calibration or {}
        bounds = c.get("wand_p99_bounds")
        agreement = c.get("speculative_agreement") or {}
        return cls(None if bounds is None else tuple(float(b) for b in bounds),
                   tuple(sorted((str(k), float(v)) for k, v in agreement.items())))

    def draft_agreement(self, draft_stage: int, default: float) -> float:
        return dict(self.speculative_agreement).get(str(draft_stage), default)
