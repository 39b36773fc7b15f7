"""Checkpoints: atomic directories of safetensors + JSON, and loading a model from one.

A checkpoint is a directory
    config.json          the PoEConfig
    model.safetensors    weights (fp32 while training; the shipped model may be bf16)
    tokenizer_bpe.json   the tokenizer
    meta.json            step, metrics, data position, python/numpy RNG, train args, WAND bounds
    optimizer.safetensors + optimizer.json   optimiser tensors and the rest of its state (training only)
    rng.safetensors      torch (and CUDA) RNG states (training only)
written into a temporary sibling directory, every file fsynced, then renamed into place: a reader
(or a run killed mid-save) sees either the old set of checkpoints or the new one, never half of one.
Nothing is unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PoEConfig
from .errors import PoEError
from .fileio import atomic_directory_write, write_json_atomic

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STEP_PREFIX = "step_"
DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo"


def _split_optimizer_state(flat: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flattened optimiser state (keys 'state.<param>.<key>', 'param_groups.<param>.<key>'):
    tensors for safetensors, everything else for JSON."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    rest = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    flat = dict(tensors)
    for k, v in rest.items():
        flat[k] = tuple(v) if k.endswith(".betas") else v
    return flat


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import random
    import numpy as np
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], other: dict) -> None:
    import random
    import numpy as np
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    n = other["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = other["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(path, model, tokenizer=None, meta: dict | None = None, optimizers=None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory atomically. `optimizers` adds optimiser + RNG state (for --resume).
    (Distributed runs gather the full state on every rank and call `write_checkpoint` on rank 0.)"""
    from .distributed import full_state
    model_state, optim_state = full_state(model, optimizers)
    return write_checkpoint(path, model.config, model_state, tokenizer, meta, optim_state, dtype)


def write_checkpoint(path, config: PoEConfig, model_state: dict, tokenizer=None, meta: dict | None = None,
                     optim_state: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    def write(tmp: Path):
        write_json_atomic(tmp / "config.json", config.to_dict())
        state = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
                 for k, v in model_state.items()}
        save_file(state, tmp / MODEL_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)
        m = dict(meta or {})
        m.setdefault("format", "poegpt-checkpoint")
        m.setdefault("format_version", 1)
        if optim_state is not None:
            opt_tensors, opt_rest = _split_optimizer_state(optim_state)
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            write_json_atomic(tmp / "optimizer.json", opt_rest)
            rng_tensors, rng_other = rng_state()
            save_file(rng_tensors, tmp / "rng.safetensors")
            m["rng"] = rng_other
        write_json_atomic(tmp / META_FILE, m)
    return atomic_directory_write(Path(path), write)


def read_meta(path) -> dict:
    f = Path(path) / META_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise PoEError(f"{path} is not a poegpt checkpoint (no {META_FILE}); point to a checkpoint directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoEError(f"{f} is corrupt ({e}); use an earlier checkpoint") from None


def checkpoints_in(run_dir) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (temporary directories are ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from: None or "demo" (the shipped demo model, unless a folder named demo
    exists here), a checkpoint dir, or a run dir (its latest checkpoint)."""
    if path is None or (str(path) == "demo" and not Path(path).exists()):
        if not (DEMO_MODEL_DIR / META_FILE).exists():
            raise PoEError("no demo model is shipped in this install; pass --model PATH (a checkpoint or run directory)")
        return DEMO_MODEL_DIR
    p = Path(path)
    if not p.exists():
        raise PoEError(f"model path {p} does not exist; pass a checkpoint or run directory")
    if (p / META_FILE).exists() or (p / MODEL_FILE).exists():
        return p
    ckpts = checkpoints_in(p)
    if not ckpts:
        raise PoEError(f"{p} holds no checkpoint (no {META_FILE} and no checkpoints/step_*); train first or fix the path")
    return ckpts[-1]


def read_tensors(f: Path, missing: str = "", corrupt: str = "") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one PoEError line saying it is missing or unreadable
    (`missing` / `corrupt`: what that means for the caller, appended to the message)."""
    try:
        return load_file(f)
    except FileNotFoundError:
        raise PoEError(f"{f} is missing{missing}") from None
    except (SafetensorError, OSError) as e:
        raise PoEError(f"{f} is not a readable safetensors file ({e}){corrupt}") from None


def _read_state(path) -> dict[str, torch.Tensor]:
    return read_tensors(Path(path) / MODEL_FILE, "; the checkpoint is incomplete", "; the checkpoint is corrupt")


def load_state(path, model, state: dict | None = None) -> None:
    """Load model.safetensors (or `state`, read from it) into `model`, checking names and shapes
    against its config."""
    f = Path(path) / MODEL_FILE
    state = _read_state(path) if state is None else state
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape of {bad[0]} is {tuple(state[bad[0]].shape)}, config wants {tuple(expected[bad[0]].shape)}")
        raise PoEError(f"{f} does not match its config.json ({what}); the checkpoint is corrupt or mixed up")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def initial_config(path, tokenizer, data, stages=None, **overrides) -> PoEConfig:
    """The config of a run that starts from the checkpoint (or run) at `path`: its own, with `overrides`
    and, when given, the stage layout `stages`. The data's `tokenizer` must be the checkpoint's."""
    from .tokenizer import TOKENIZER_FILE, Tokenizer
    ckpt = resolve_checkpoint(path)
    cfg = PoEConfig.load(ckpt)
    own = Tokenizer.load(ckpt) if (ckpt / TOKENIZER_FILE).exists() else None
    same = cfg.vocab_size == tokenizer.vocab_size and (
        own is None or (own.pattern, own.mergeable_ranks) == (tokenizer.pattern, tokenizer.mergeable_ranks))
    if not same:
        raise PoEError(f"the data {data} was tokenised with another tokenizer ({tokenizer.vocab_size} ids) than the "
                       f"model {path} uses ({cfg.vocab_size} ids); prepare it with --tokenizer {path}")
    if stages:
        overrides["stage_layout"] = tuple(stages)
    return cfg.replace(**overrides)


def load_initial_state(path, model) -> None:
    """Start `model` from the weights of the checkpoint (or run) at `path`, whose config may differ from
    the model's in its stage layout only: a re-cut needs the checkpoint's stage heads to be zero (an
    imported dense model), and gives zero heads of the new count."""
    ckpt = resolve_checkpoint(path)
    src, cfg = PoEConfig.load(ckpt), model.config
    state = _read_state(ckpt)
    if src.stage_layout != cfg.stage_layout:
        heads = [k for k in state if k.startswith("lm_head_stages.")]
        if any(bool(state[k].any()) for k in heads):
            raise PoEError(f"{ckpt} has trained stage heads for the layout {list(src.stage_layout)}; re-cutting it "
                           f"to {list(cfg.stage_layout)} would drop them: keep its layout (leave out --stages)")
        shape = state["lm_head.weight"].shape
        state = {k: v for k, v in state.items() if k not in heads}
        state.update({f"lm_head_stages.{k}.weight": torch.zeros(shape) for k in range(cfg.n_stages)})
    load_state(ckpt, model, state)


def load_model(path=None, device="cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer or None) from a checkpoint / run directory / None = demo model."""
    from .api import PoEGPT
    from .config import Calibration
    from .tokenizer import TOKENIZER_FILE, Tokenizer
    ckpt = resolve_checkpoint(path)
    cfg = PoEConfig.load(ckpt)
    with torch.device("meta"):
        model = PoEGPT(cfg)
    model = model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables); weights are overwritten below
    load_state(ckpt, model)
    model = model.to(dtype).eval()
    tok = Tokenizer.load(ckpt) if (ckpt / TOKENIZER_FILE).exists() else None
    model.checkpoint_meta = read_meta(ckpt) if (ckpt / META_FILE).exists() else {}
    model.calibration = Calibration.from_meta(model.checkpoint_meta.get("calibration"))
    return model, tok


def load_training_state(path, model, optimizers) -> dict:
    """Restore optimiser (and RNG) state from a checkpoint into `optimizers` of `model`; return its meta.
    Under FSDP every rank calls this (the state is full and keyed by parameter name)."""
    from .distributed import load_optimizer_state
    path = Path(path)
    meta = read_meta(path)
    try:
        opt_tensors = load_file(path / "optimizer.safetensors")
        opt_rest = json.loads((path / "optimizer.json").read_text())
        rng_tensors = load_file(path / "rng.safetensors")
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError) as e:
        raise PoEError(f"{path} has no complete training state ({e}); it cannot be resumed from") from None
    load_optimizer_state(model, optimizers, _join_optimizer_state(opt_tensors, opt_rest))
    set_rng_state(rng_tensors, meta["rng"])
    return meta


def prune_checkpoints(run_dir, keep: int) -> None:
    for old in checkpoints_in(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def pack_checkpoint(src, out, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A slim inference checkpoint from a training one: weights in `dtype`, the tokenizer, and the
    meta a user needs (step, tokens, validation metrics, train args, calibration), without the
    optimiser, RNG and data-loader state. This is how the shipped demo model is made."""
    from .tokenizer import TOKENIZER_FILE, Tokenizer
    ckpt = resolve_checkpoint(src)
    cfg = PoEConfig.load(ckpt)
    try:
        state = load_file(ckpt / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        raise PoEError(f"{ckpt / MODEL_FILE} is not readable ({e}); the checkpoint is corrupt") from None
    tok = Tokenizer.load(ckpt) if (ckpt / TOKENIZER_FILE).exists() else None
    meta = {k: v for k, v in read_meta(ckpt).items() if k in ("step", "tokens", "val", "train_args", "calibration")}
    meta["packed_from"] = {"step": meta.get("step"), "dtype": str(dtype).removeprefix("torch.")}
    return write_checkpoint(out, cfg, state, tok, meta, dtype=dtype)
