"""Hugging Face export and import (docs/design.md §10.3): `poegpt export-hf CHECKPOINT OUT`,
`poegpt import-hf FOLDER OUT`.

The exported folder loads with `trust_remote_code=True` where poegpt is not installed:

    config.json                 PoEGPTConfig (+ auto_map, architectures, WAND bounds)
    configuration_poegpt.py     poegpt/integrations/hf/remote/configuration_poegpt.py
    modeling_poegpt.py          poegpt/integrations/hf/remote/modeling_poegpt.py
    poegpt_model.py, ...        poegpt's own modules that those import (model, engine, logop, ...)
    model.safetensors           the checkpoint's tensors, names prefixed with "model."
    generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json     (`tokenizer.py`)
    README.md                   model card: architecture, stages, the six modes, metrics (`card.py`)
    eval/                       the evaluation report, when one is found

One source of truth: the modeling code in the folder *is* the package's code. The `.py` files are
copied from the package with only their relative imports rewritten for a flat folder (transformers
copies a remote module's siblings by following its `from .x import` lines), so the exported model
cannot drift from poegpt's; `remote_sources()` fails if a module of that closure imports `poegpt`
absolutely, in a form transformers would not follow, or from outside `poegpt/` and the remote
folder. Copies of poegpt's modules get a `poegpt_` prefix so that the folder reads as what it is.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ...errors import PoEError
from .card import model_card
from .tokenizer import save_tokenizer, tokenizer_from_json

PACKAGE_DIR = Path(__file__).resolve().parents[2]           # poegpt/
REMOTE_DIR = Path(__file__).resolve().parent / "remote"     # the transformers wrapper
REMOTE_ENTRIES = ("configuration_poegpt", "modeling_poegpt")
COPY_PREFIX = "poegpt_"
WEIGHT_PREFIX = "model."
AUTO_MAP = {
    "AutoConfig": "configuration_poegpt.PoEGPTConfig",
    "AutoModel": "modeling_poegpt.PoEGPTForCausalLM",
    "AutoModelForCausalLM": "modeling_poegpt.PoEGPTForCausalLM",
}
ARCHITECTURE = "PoEGPTForCausalLM"

_RELATIVE_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<dots>\.+)(?P<module>\w+)(?P<rest>[ \t]+import\b)", re.M)
_BARE_RELATIVE_IMPORT = re.compile(r"^[ \t]*(from[ \t]+\.+[ \t]+import|import[ \t]+\.)", re.M)
_ABSOLUTE_SELF_IMPORT = re.compile(r"^[ \t]*(from|import)[ \t]+poegpt\b", re.M)


def _need_hf():
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise PoEError("the Hugging Face export needs transformers and tokenizers: pip install 'poegpt[hf]'") from None


# --- the exported source files -----------------------------------------------------------------------
def exported_name(path: Path) -> str:
    """A package module's file name in the flat exported folder."""
    path = path.resolve()
    if path.parent == REMOTE_DIR.resolve():
        return path.name
    if path.parent == PACKAGE_DIR.resolve():
        return COPY_PREFIX + path.name
    raise PoEError(f"{path} is outside poegpt/ and poegpt/integrations/hf/remote/; the export copies modules of those two only")


def remote_sources() -> dict[str, str]:
    """{file name in the folder: source}: the wrapper modules and every poegpt module they import,
    directly or not, each with its relative imports pointed at the copied siblings."""
    out: dict[str, str] = {}
    todo = [REMOTE_DIR / f"{name}.py" for name in REMOTE_ENTRIES]
    while todo:
        path = todo.pop()
        name = exported_name(path)
        if name in out:
            continue
        text = path.read_text(encoding="utf-8")
        if _ABSOLUTE_SELF_IMPORT.search(text) or _BARE_RELATIVE_IMPORT.search(text):
            raise PoEError(f"{path.name} imports poegpt absolutely or as `from . import x`; the exported folder "
                           "needs `from .module import name` imports only")

        def rewrite(m: re.Match) -> str:
            target = path.parent
            for _ in range(len(m["dots"]) - 1):
                target = target.parent
            target = target / f"{m['module']}.py"
            if not target.is_file():
                raise PoEError(f"{path.name}: cannot export `from {m['dots']}{m['module']}`, which is not a module file")
            todo.append(target)
            return f"{m['indent']}from .{exported_name(target)[:-3]}{m['rest']}"

        out[name] = _RELATIVE_IMPORT.sub(rewrite, text)
    return dict(sorted(out.items()))


# --- the evaluation report ----------------------------------------------------------------------------
def find_eval_report(ckpt: Path, given=None) -> Path | None:
    """The evaluation report directory: --eval if given, else an eval/ of the checkpoint or its run
    whose report names this checkpoint (a report of an older checkpoint of the run is not used)."""
    from ...checkpoint import resolve_checkpoint
    if given is not None:
        d = Path(given)
        if not (d / "report.json").is_file():
            raise PoEError(f"no report.json in {d}; pass the directory written by `poegpt eval --out`")
        return d
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    for d in (ckpt / "eval", run / "eval", run.parent / "eval"):
        try:
            report = json.loads((d / "report.json").read_text())
        except (OSError, ValueError):
            continue
        model = report.get("model")
        for base in (Path.cwd(), d.parent, d.parent.parent):
            try:
                if model and resolve_checkpoint(base / model).resolve() == ckpt.resolve():
                    return d
            except PoEError:
                pass
    return None



# --- export / import ---------------------------------------------------------------------------------
def _check_out(out: Path, force: bool, protect: Path | None = None) -> None:
    if protect is not None and (out.resolve() == protect.resolve() or out.resolve() in protect.resolve().parents):
        raise PoEError(f"{out} holds the source {protect}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise PoEError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PoEError(f"{out} exists and is not empty; pass --force to replace it")


def _check_state(state: dict, cfg, where) -> None:
    """Tensor names and shapes must be those of a PoEGPT with this config."""
    import torch
    from ...model import PoEModel as PoEGPT
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PoEGPT(cfg).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise PoEError(f"{where} does not match its config (first difference: {diff[0]}); it is corrupt or mixed up")


def _param_counts(cfg) -> dict:
    import torch
    from ...model import PoEModel as PoEGPT
    with torch.device("meta"):
        return PoEGPT(cfg).params_by_component()


def export_hf(checkpoint, out_dir, eval_dir=None, force: bool = False, dtype: str | None = None) -> Path:
    """Write a transformers folder for a checkpoint (or the newest checkpoint of a run directory)."""
    _need_hf()
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    from ...checkpoint import META_FILE, MODEL_FILE, read_meta, read_tensors, resolve_checkpoint
    from ...config import PoEConfig
    from ...fileio import atomic_directory_write
    from ...tokenizer import TOKENIZER_FILE, Tokenizer
    from .remote.configuration_poegpt import PoEGPTConfig

    if checkpoint is None:
        raise PoEError("give the checkpoint (or run directory) to export")
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    _check_out(out, force, protect=ckpt)
    cast = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in cast:
        raise PoEError(f"dtype must be fp32 or bf16 (or left out to keep the checkpoint's), got {dtype!r}")
    cfg = PoEConfig.load(ckpt)
    state = read_tensors(ckpt / MODEL_FILE)
    _check_state(state, cfg, ckpt / MODEL_FILE)
    if cast[dtype] is not None:
        state = {k: v.to(cast[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    stored = {v.dtype for v in state.values() if v.is_floating_point()}
    weight_dtype = str(next(iter(stored))).replace("torch.", "") if len(stored) == 1 else "float32"
    if not (ckpt / TOKENIZER_FILE).exists():
        raise PoEError(f"{ckpt} has no {TOKENIZER_FILE}; the export needs the tokenizer the model was trained with")
    tok = Tokenizer.load(ckpt)
    if tok.vocab_size > cfg.vocab_size:
        raise PoEError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; they do not belong together")
    meta = read_meta(ckpt) if (ckpt / META_FILE).exists() else {}
    calibration = meta.get("calibration", {})
    report_dir = find_eval_report(ckpt, eval_dir)
    report = json.loads((report_dir / "report.json").read_text()) if report_dir else None
    bos = tok.bos_id
    hf_config = PoEGPTConfig.from_poe_config(
        cfg, bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP), dtype=weight_dtype, wand_p99_bounds=calibration.get("wand_p99_bounds"),
        speculative_agreement=calibration.get("speculative_agreement"))
    sources = remote_sources()

    def write(tmp: Path):
        for name, text in sources.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(hf_config.to_json_string(use_diff=True), encoding="utf-8")
        save_file({WEIGHT_PREFIX + k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        GenerationConfig(bos_token_id=bos, eos_token_id=bos, pad_token_id=bos).save_pretrained(tmp)
        save_tokenizer(tok, tmp, cfg.sequence_len)
        (tmp / "README.md").write_text(model_card(out.resolve().name, cfg, _param_counts(cfg), meta, report,
                                                  calibration), encoding="utf-8")
        if report_dir is not None:
            shutil.copytree(report_dir, tmp / "eval")

    atomic_directory_write(out, write)
    return out


def import_hf(folder, out_dir, force: bool = False) -> Path:
    """Turn an exported folder back into a poegpt checkpoint (weights, config, tokenizer, calibration)."""
    _need_hf()
    from ...checkpoint import read_tensors, write_checkpoint
    from .remote.configuration_poegpt import PoEGPTConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PoEError(f"no config.json in {folder}; point to a folder written by `poegpt export-hf`")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PoEError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    if raw.get("model_type") != "poegpt":
        raise PoEError(f"{folder} is not a folder written by export-hf (its config.json has model_type "
                       f"{raw.get('model_type')!r}, not 'poegpt')")
    out = Path(out_dir)
    _check_out(out, force, protect=folder)
    hf_config = PoEGPTConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    cfg = hf_config.to_poe_config()
    tensors = read_tensors(folder / "model.safetensors")
    if any(not k.startswith(WEIGHT_PREFIX) for k in tensors):
        raise PoEError(f"{folder / 'model.safetensors'} has tensors outside `{WEIGHT_PREFIX}*`; it was not written by export-hf")
    state = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items()}
    _check_state(state, cfg, folder / "model.safetensors")
    tok = tokenizer_from_json(folder / "tokenizer.json")
    calibration = {}
    if hf_config.wand_p99_bounds is not None:
        calibration["wand_p99_bounds"] = list(hf_config.wand_p99_bounds)
    if hf_config.speculative_agreement:
        calibration["speculative_agreement"] = dict(hf_config.speculative_agreement)
    meta = {"imported_from": str(folder), **({"calibration": calibration} if calibration else {})}
    return write_checkpoint(out, cfg, state, tok, meta)


# --- CLI ----------------------------------------------------------------------------------------------
def cmd_export(a) -> None:
    out = export_hf(a.checkpoint, a.out, eval_dir=a.eval, force=a.force, dtype=a.dtype)
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    print(f"exported to {out}: {', '.join(files)}")
    print(f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")


def cmd_import(a) -> None:
    out = import_hf(a.folder, a.out, force=a.force)
    print(f"poegpt checkpoint written to {out}")


def add_export_parser(sub) -> None:
    """`poegpt export-hf` and `poegpt import-hf`."""
    s = sub.add_parser("export-hf", help="write a transformers folder (trust_remote_code) for a checkpoint")
    s.add_argument("checkpoint", help="checkpoint or run directory (its newest checkpoint)")
    s.add_argument("out", help="output folder")
    s.add_argument("--eval", help="evaluation report directory (`poegpt eval --out`); found next to the run if left out")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="weight dtype (default: as stored)")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("import-hf", help="turn a folder written by export-hf back into a poegpt checkpoint")
    s.add_argument("folder", help="folder written by poegpt export-hf")
    s.add_argument("out", help="checkpoint directory to write")
    s.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    s.set_defaults(fn=cmd_import)
