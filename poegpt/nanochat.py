"""nanochat interop: import a nanochat base checkpoint as a dense poegpt checkpoint, and export one back.

nanochat saves `base_checkpoints/dNN/model_<step>.pt` (a state dict, keys maybe prefixed `_orig_mod.`
by torch.compile), `meta_<step>.json` (its GPTConfig under "model_config") and `tokenizer/tokenizer.pkl`
(a pickled tiktoken Encoding). The weights are read with `torch.load(weights_only=True)`; the pickle is
read by an unpickler that admits only tiktoken's Encoding and keeps its state (pattern, ranks, special
tokens) without constructing anything. The imported model is dense: every additive stage head is zero,
so each stage's head is nanochat's `lm_head` and stage K-1 alone is nanochat's model.

The export writes the dense model, stage K-1 alone, in that layout: nanochat's lm_head is W_s + W_{K-1}
(the summed head stage K-1 predicts with), the trunk is copied as is, the earlier stage heads are left
out, and the tokenizer is pickled by tiktoken itself. A config nanochat's trunk cannot express is refused.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
from pathlib import Path

import tiktoken
import torch

from .checkpoint import save_checkpoint
from .config import PoEConfig, card_stage_layout, parse_layout
from .errors import PoEError
from .fileio import atomic_directory_write
from .api import PoEGPT
from .tokenizer import SPECIAL_TOKENS, Tokenizer

KNOWN_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}
KEY_RENAMES = (("transformer.wte.", "wte."), ("transformer.h.", "blocks."))   # nanochat's prefix, poegpt's
BUILT_IN = {"softcap": 15.0, "rope_base": 100_000.0, "value_embeds": True}     # fixed in nanochat's trunk


class _EncodingState:
    """Stand-in for tiktoken.core.Encoding while unpickling: records the state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise PoEError(f"tokenizer.pkl refers to {module}.{name}; only a tiktoken Encoding is accepted")


def read_tokenizer_pickle(path) -> Tokenizer:
    """poegpt Tokenizer from nanochat's tokenizer.pkl, without running arbitrary pickle code."""
    path = Path(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except PoEError:
        raise
    except FileNotFoundError:
        raise PoEError(f"no tokenizer at {path}; pass --tokenizer DIR (nanochat's tokenizer folder)") from None
    except Exception as e:
        raise PoEError(f"{path} is not a readable tokenizer pickle ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None)
    if not isinstance(obj, _EncodingState) or not isinstance(state, dict):
        raise PoEError(f"{path} does not hold a tiktoken Encoding")
    pattern, ranks, special = state.get("pat_str"), state.get("mergeable_ranks"), state.get("special_tokens")
    if not (isinstance(pattern, str) and isinstance(ranks, dict) and isinstance(special, dict)
            and all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items())):
        raise PoEError(f"{path}: the Encoding lacks a pattern, byte ranks or special tokens")
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if special != expected:
        raise PoEError(f"{path}: special tokens {sorted(special)} are not nanochat's nine after the ranks")
    return Tokenizer(ranks, pattern=pattern)


def find_checkpoint(src, step: int | None = None) -> tuple[Path, int]:
    """The dNN folder and step to import: `src` is a dNN folder or nanochat's base dir."""
    src = Path(src)
    if not src.is_dir():
        raise PoEError(f"{src} is not a directory; give a nanochat base_checkpoints/dNN folder or its base dir")
    folders = [src] + sorted((p for p in (src / "base_checkpoints").glob("d*") if p.is_dir()),
                             key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in folders:
        steps = sorted(int(m.group(1)) for p in folder.glob("model_*.pt")
                       if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
        if steps:
            if step is None:
                return folder, steps[-1]
            if step in steps:
                return folder, step
            raise PoEError(f"{folder} has no step {step}; it has {', '.join(map(str, steps))}")
    raise PoEError(f"no nanochat checkpoint (model_<step>.pt) under {src}")


def config_from_meta(model_config: dict, stages: tuple[int, ...] | None) -> PoEConfig:
    """PoEConfig for nanochat's GPTConfig; a field poegpt cannot express is an error naming it."""
    unknown = sorted(set(model_config) - KNOWN_FIELDS)
    if unknown:
        raise PoEError(f"nanochat config field(s) {', '.join(unknown)} are not supported by poegpt's trunk")
    c = {"window_pattern": "L", **model_config}      # nanochat's own default for old checkpoints
    missing = sorted(KNOWN_FIELDS - set(c))
    if missing:
        raise PoEError(f"nanochat meta lacks model_config field(s) {', '.join(missing)}")
    L = c["n_layer"]
    if c["n_embd"] % c["n_head"]:
        raise PoEError(f"nanochat config: n_embd {c['n_embd']} is not a multiple of n_head {c['n_head']}")
    cfg = PoEConfig(vocab_size=c["vocab_size"], n_layer=L, n_embd=c["n_embd"], n_head=c["n_head"],
                    n_kv_head=c["n_kv_head"], head_dim=c["n_embd"] // c["n_head"], sequence_len=c["sequence_len"],
                    window_pattern=c["window_pattern"].upper(),
                    stage_layout=stages or (card_stage_layout(L) if L >= 4 else (L,)))
    check_windows(cfg)
    return cfg


def check_windows(cfg: PoEConfig) -> None:
    """nanochat's short window is ceil((sequence_len // 4) / 128) * 128; refuse a config whose S layers differ."""
    nano_short = math.ceil(cfg.sequence_len // 4 / 128) * 128
    if any(w != cfg.sequence_len for w in cfg.windows) and cfg.short_window != nano_short:
        raise PoEError(f"window_pattern {cfg.window_pattern!r} at sequence_len {cfg.sequence_len}: nanochat's short "
                       f"window is {nano_short} but poegpt's is {cfg.short_window}; the trunks differ there")


def nanochat_model_config(cfg: PoEConfig) -> dict:
    """nanochat's model_config (its GPTConfig) for a poegpt config; one PoEError if nanochat cannot express it."""
    for name, built_in in BUILT_IN.items():
        if getattr(cfg, name) != built_in:
            raise PoEError(f"nanochat cannot express {name}={getattr(cfg, name)!r} (its trunk has {built_in!r} built "
                           f"in); this model cannot be exported to nanochat")
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        raise PoEError(f"nanochat's head_dim is n_embd / n_head ({cfg.n_embd} / {cfg.n_head}), but this model's is "
                       f"{cfg.head_dim}; it cannot be exported to nanochat")
    check_windows(cfg)
    return {"sequence_len": cfg.sequence_len, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.n_embd,
            "window_pattern": cfg.window_pattern}


def state_dict_from_nanochat(sd: dict, cfg: PoEConfig) -> dict:
    """Rename nanochat's keys to poegpt's and add zero stage heads."""
    out = {}
    for key, value in sd.items():
        key = _rename(key.removeprefix("_orig_mod."), KEY_RENAMES)
        out[key] = value.float() if value.dtype == torch.bfloat16 else value
    head = out.get("lm_head.weight")
    if head is None or head.shape != (cfg.padded_vocab_size, cfg.n_embd):
        shape = None if head is None else tuple(head.shape)
        raise PoEError(f"lm_head.weight is {shape} but the meta's vocab_size {cfg.vocab_size} and n_embd "
                       f"{cfg.n_embd} need {(cfg.padded_vocab_size, cfg.n_embd)}; the meta does not match the weights")
    for k in range(cfg.n_stages):
        out[f"lm_head_stages.{k}.weight"] = torch.zeros_like(head)
    return out


def state_dict_to_nanochat(model) -> dict:
    """nanochat's state dict of the dense model, stage K-1: its summed head W_s + W_{K-1} as lm_head."""
    renames = tuple((ours, nano) for nano, ours in KEY_RENAMES)
    with torch.no_grad():
        out = {_rename(k, renames): v.detach().float().clone() for k, v in model.state_dict().items()
               if not k.startswith("lm_head_stages.")}
        out["lm_head.weight"] = model.head_weight(model.config.n_stages - 1).detach().float().clone()
    return out


def _rename(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_nanochat(src, step: int | None = None, tokenizer_dir=None, stages=None) -> tuple[PoEGPT, Tokenizer, dict]:
    """(model, tokenizer, nanochat meta) from a nanochat checkpoint; nothing is written."""
    folder, step = find_checkpoint(src, step)
    try:
        meta = json.loads((folder / f"meta_{step:06d}.json").read_text())
    except FileNotFoundError:
        raise PoEError(f"{folder} has model_{step:06d}.pt but no meta_{step:06d}.json") from None
    except json.JSONDecodeError as e:
        raise PoEError(f"{folder}/meta_{step:06d}.json is not valid JSON ({e})") from None
    if not isinstance(meta.get("model_config"), dict):
        raise PoEError(f"{folder}/meta_{step:06d}.json has no model_config")
    cfg = config_from_meta(meta["model_config"], tuple(stages) if stages else None)
    try:
        sd = torch.load(folder / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise PoEError(f"{folder}/model_{step:06d}.pt cannot be read ({type(e).__name__}); is it truncated?") from None
    if not isinstance(sd, dict):
        raise PoEError(f"{folder}/model_{step:06d}.pt does not hold a state dict")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else next(
        (p / "tokenizer" for p in (folder.parent.parent, folder.parent, folder) if (p / "tokenizer").is_dir()),
        folder / "tokenizer")
    tokenizer = read_tokenizer_pickle(tok_dir / "tokenizer.pkl")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise PoEError(f"the tokenizer has {tokenizer.vocab_size} ids but the meta's vocab_size is {cfg.vocab_size}")
    with torch.device("meta"):
        model = PoEGPT(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights()  # buffers (rotary tables), as load_model does; the weights are overwritten below
    try:
        model.load_state_dict(state_dict_from_nanochat(sd, cfg), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PoEError(f"the weights do not match the meta's model_config: {first}") from None
    return model.eval(), tokenizer, {"nanochat_step": step, "nanochat_dir": str(folder)}


def import_nanochat(src, out, step=None, tokenizer_dir=None, stages=None) -> Path:
    """Write a poegpt checkpoint at `out` from a nanochat checkpoint (atomically; nothing on error)."""
    out = Path(out)
    if out.exists():
        raise PoEError(f"{out} already exists; choose a new OUT")
    model, tokenizer, meta = load_nanochat(src, step, tokenizer_dir, stages)
    return save_checkpoint(out, model, tokenizer, {"step": 0, "imported_from": meta})


def export_nanochat(src, out) -> Path:
    """Write the dense model (stage K-1) of the checkpoint or run `src` as a nanochat base dir at `out`:
    base_checkpoints/dNN/model_<step>.pt + meta_<step>.json, tokenizer/tokenizer.pkl + token_bytes.pt.
    Atomic; on any error nothing is written."""
    from .checkpoint import load_model, read_meta, resolve_checkpoint
    out = Path(out)
    if out.exists():
        raise PoEError(f"{out} already exists; choose a new OUT")
    ckpt = resolve_checkpoint(src)
    model, tokenizer = load_model(ckpt)
    if tokenizer is None:
        raise PoEError(f"{ckpt} has no tokenizer; nanochat needs one (export a checkpoint that has tokenizer_bpe.json)")
    model_config = nanochat_model_config(model.config)
    own_meta = read_meta(ckpt)
    step = int(own_meta.get("step", 0))
    state, meta = state_dict_to_nanochat(model), _nanochat_meta(model.config, ckpt, own_meta, model_config)
    encoding = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.mergeable_ranks,
                                 special_tokens=tokenizer.special_tokens)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int32)

    def write(tmp: Path) -> None:
        folder = tmp / "base_checkpoints" / f"d{model.config.n_layer}"
        _write(folder / f"model_{step:06d}.pt", lambda f: torch.save(state, f))
        _write(folder / f"meta_{step:06d}.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _write(tmp / "tokenizer" / "tokenizer.pkl", lambda f: pickle.dump(encoding, f))
        _write(tmp / "tokenizer" / "token_bytes.pt", lambda f: torch.save(token_bytes, f))
    return atomic_directory_write(out, write)


def _nanochat_meta(cfg: PoEConfig, ckpt: Path, own_meta: dict, model_config: dict) -> dict:
    """meta_<step>.json with nanochat's keys; what poegpt does not know (nanochat's loop state) is null."""
    args = own_meta.get("train_args") or {}
    rows = args.get("batch_size")
    tokens = args.get("tokens_per_step") or (rows and rows * (args.get("sequence_len") or cfg.sequence_len))
    return {"step": int(own_meta.get("step", 0)), "val_bpb": None, "model_config": model_config,
            "user_config": {"exported_by": "poegpt export-nanochat", "poegpt_checkpoint": str(ckpt),
                            "stage_layout": list(cfg.stage_layout), "dense_stage": cfg.n_stages - 1,
                            "depth": cfg.n_layer, "max_seq_len": cfg.sequence_len,
                            "window_pattern": cfg.window_pattern},
            "device_batch_size": rows, "max_seq_len": cfg.sequence_len,
            "total_batch_size": tokens,
            "dataloader_state_dict": None,
            "loop_state": {"min_val_bpb": None, "smooth_train_loss": None, "total_training_time": None}}


def _write(path: Path, fill) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def add_parsers(sub) -> None:
    p = sub.add_parser("import-nanochat", help="import a nanochat base checkpoint as a dense poegpt checkpoint")
    p.add_argument("src", metavar="NANOCHAT_DIR", help="a base_checkpoints/dNN folder or nanochat's base dir")
    p.add_argument("out", metavar="OUT", help="the poegpt checkpoint directory to write (must not exist)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to import (default: the newest)")
    p.add_argument("--tokenizer", default=None, help="folder holding tokenizer.pkl (default: the base dir's tokenizer/)")
    p.add_argument("--stages", default=None,
                   help="stage layout, layers per stage, e.g. 12,5,4,3 (default: the card's proportions)")
    p.set_defaults(fn=_cmd_import)
    p = sub.add_parser("export-nanochat", help="write a run's dense model (stage K-1) as a nanochat base checkpoint")
    p.add_argument("src", metavar="RUN", help="a poegpt checkpoint or run directory (its newest checkpoint)")
    p.add_argument("out", metavar="OUT", help="nanochat base dir to write: base_checkpoints/dNN/ and tokenizer/ "
                                              "(must not exist)")
    p.set_defaults(fn=_cmd_export)


def _cmd_import(args) -> None:
    path = import_nanochat(args.src, args.out, args.step, args.tokenizer, parse_layout(args.stages))
    print(f"imported nanochat checkpoint -> {path}")


def _cmd_export(args) -> None:
    path = export_nanochat(args.src, args.out)
    print(f"exported the dense model (stage K-1) as a nanochat checkpoint -> {path}")
