"""The `poegpt` command: a thin argparse layer over the package (docs/design.md §10.1).

    poegpt info      --preset 1.5b | --depth 12 | --model PATH
    poegpt tokenizer --recipe sample --vocab-size 4096 --out DIR
    poegpt prepare   --recipe sample --tokenizer DIR --out DATA
    poegpt train     --data DATA --out RUN [--preset tiny | --depth N] [--objective ...] [--resume]
    poegpt adapt     --model IMPORTED --data DATA --out RUN [--stages 2,1,1] [--train heads] [--resume]
    poegpt eval      --model RUN --data DATA [--prompts FILE] [--out eval]
    poegpt generate  --model RUN --prompt "..." [--max-new-tokens 64] [--temperature 0.8 --seed 0]

A user error is one line on stderr (`poegpt: error: ...`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .errors import PoEError


def cmd_env(a) -> None:
    from .hardware import describe
    for key, value in describe().items():
        print(f"{key:16s} {json.dumps(value, ensure_ascii=False)}")


def cmd_info(a) -> None:
    import torch
    from .config import PoEConfig
    from .model import PoEModel as PoEGPT
    meta = None
    if a.model:
        from .checkpoint import read_meta, resolve_checkpoint
        path = resolve_checkpoint(a.model)
        cfg, meta = PoEConfig.load(path), read_meta(path)
    elif a.depth:
        cfg = PoEConfig.from_depth(a.depth, vocab_size=a.vocab_size or 48_000)
    else:
        cfg = PoEConfig.from_preset(a.preset or "1.5b")
    with torch.device("meta"):
        model = PoEGPT(cfg)
    counts = model.params_by_component()
    print("config:")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<15} {v}")
    print(f"  {'boundaries':<15} {list(cfg.boundaries)}")
    print(f"  {'windows':<15} {list(cfg.windows)}")
    print(f"\nparameters: {counts['total']:,}")
    for k, v in counts.items():
        if k != "total":
            print(f"  {k:<18} {v:>15,}  {100 * v / counts['total']:5.1f}%")
    ctx = cfg.sequence_len
    print(f"\nFLOPs per token (decoding at context {ctx}, prefix PoE of the first m stages):")
    full = model.flops_per_token(context=ctx)
    for m in range(1, cfg.n_stages + 1):
        f = model.flops_per_token(m, context=ctx)
        print(f"  stages 0..{m - 1}: layers 0..{cfg.boundaries[m - 1]:<3} {f / 1e9:9.3f} GFLOP  "
              f"({100 * f / full:5.1f}% of full)")
    print(f"training FLOPs per token ({cfg.objective}): {model.train_flops_per_token() / 1e9:.3f} GFLOP")
    print(f"KV cache: {model.kv_bytes_per_token(torch.bfloat16):,} bytes per token (bf16)")
    if meta:
        print(f"\ncheckpoint: step {meta.get('step', '?')}, {meta.get('tokens', 0):,} tokens trained")
        if "val" in meta:
            b = meta["val"]["bpb"]
            print(f"  last training eval: val BPB full {b['full']:.4f}, stages " + " / ".join(f"{x:.4f}" for x in b["stages"]))
        if "calibration" in meta:
            print("  WAND p99 bounds " + ", ".join(f"{x:.3f}" for x in meta["calibration"]["wand_p99_bounds"]))


def cmd_tokenizer(a) -> None:
    from .data import load_mixture, read_documents
    from .tokenizer import Tokenizer, train_from_files
    if a.input:
        tok = train_from_files(a.input, a.vocab_size, max_chars=a.max_chars)
    else:
        mixture = load_mixture(a.recipe)
        base_share = sum(src.share for src in mixture.base)

        def texts():   # with --max-chars, each base source gives its share of the budget
            for src in mixture.base:
                if not src.is_local:
                    raise PoEError(f"source {src.name!r} is not local; tokenizer training reads local sources only")
                budget = None if a.max_chars is None else a.max_chars * src.share / base_share
                for doc in read_documents(src):
                    if budget is not None:
                        if budget <= 0:
                            break
                        budget -= len(doc)
                    yield doc
        tok = Tokenizer.train(texts(), a.vocab_size)
    path = tok.save(a.out)
    print(f"tokenizer with {tok.vocab_size} ids written to {path}")


def cmd_prepare(a) -> None:
    from .data import prepare
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(a.tokenizer)
    manifest = prepare(a.recipe, tok, a.out, max_tokens=a.max_tokens, seed=a.seed)
    tok.save(a.out)
    print(f"prepared {a.out}: " + ", ".join(f"{s['name']} {s.get('train_tokens', 0):,}+{s.get('val_tokens', 0):,}"
                                            for s in manifest["sources"]) + " tokens (train+val)")


def cmd_train(a) -> None:
    from .train import TrainArgs

    def make(given: dict):
        if not a.data:
            raise PoEError("--data is required (a directory written by `poegpt prepare`)")
        if a.depth is not None:
            given["preset"] = None
        return TrainArgs(**given)
    _run_training(a, make)


def cmd_adapt(a) -> None:
    from .adapt import adapt_args
    from .config import parse_layout

    def make(given: dict):
        if not (a.init_from and a.data):
            raise PoEError("--model and --data are required (a checkpoint, e.g. from import-nanochat, and a "
                           "directory written by `poegpt prepare --tokenizer` that checkpoint)")
        return adapt_args(given.pop("init_from"), given.pop("data"), given.pop("out"), parse_layout(a.layout),
                          **given)
    _run_training(a, make)


def _run_training(a, make) -> None:
    """Train or adapt: resume a run from its saved arguments, or start one from `make(the flags given)`."""
    from .checkpoint import checkpoints_in
    from .train import TrainArgs, resume_args, train
    if a.resume and checkpoints_in(a.out):
        args = resume_args(a.out, steps=a.steps, progress=not a.quiet)
    else:
        fields = {f.name for f in dataclasses.fields(TrainArgs)}
        given = {k: v for k, v in vars(a).items() if k in fields and v is not None}
        given["progress"] = not a.quiet
        args = make(given)
    last = train(args, resume=a.resume, stop_at=a.stop_at)
    val = last.get("val")
    if val:
        print(f"step {last['step']}: val BPB full {val['bpb']['full']:.4f}, stages "
              + " / ".join(f"{b:.4f}" for b in val["bpb"]["stages"]))


def cmd_eval(a) -> None:
    import torch
    from .checkpoint import load_model
    from .data import TokenLoader
    from .evaluate import load_prompt_targets, prompt_target_ranks, stream_metrics, write_report
    from .hardware import resolve_dtype, set_threads
    set_threads(a.threads)
    model, tok = load_model(a.model, dtype=resolve_dtype(a.dtype))
    if tok is None:
        raise PoEError("the checkpoint has no tokenizer; evaluation needs one")
    T = model.config.sequence_len
    loader = TokenLoader(a.data, "val", a.batch_size, T, case_aug_p=0.0)
    n_batches = max(1, a.tokens // (a.batch_size * T))
    metrics = stream_metrics(model, loader.iter_batches(n_batches), torch.tensor(tok.token_byte_lengths()),
                             alpha=a.alpha)
    report = {"model": str(a.model or "demo"), "metrics": metrics, "data": str(a.data)}
    if a.prompts:
        report["prompt_ranks"] = prompt_target_ranks(model, tok, load_prompt_targets(a.prompts))
    out = write_report(report, a.out)
    b = metrics["bpb"]
    print(f"{'metric':<28}value")
    print(f"{'full/geomean BPB':<28}{b['full']:.6f}")
    print(f"{'entropy-weighted BPB':<28}{b['entropy_weighted']:.6f}  (alpha={metrics['entropy_alpha']})")
    print(f"{'full next-token accuracy':<28}{metrics['accuracy']['full']:.4f}")
    print(f"{'stage BPB':<28}" + " / ".join(f"{x:.6f}" for x in b["stages"]))
    print(f"{'prefix BPB':<28}" + " / ".join(f"{x:.6f}" for x in b["prefix"]))
    K = len(b["stages"])
    print(f"{f's{K - 2}-s{K - 1} top-1 agreement':<28}{metrics['agreement'][K - 2][K - 1]:.4f}")
    if a.prompts:
        pr = report["prompt_ranks"]
        print(f"{'prompt target ranks':<28}avg {pr['mean_rank_full']:.1f} vs {pr['mean_rank_shared']:.1f} "
              f"(full vs shared), wins/ties/losses {pr['wins']}/{pr['ties']}/{pr['losses']}")
    print(f"report written to {out}/")


def cmd_generate(a) -> None:
    from .checkpoint import load_model
    from .engine import Sampling, compile_decode
    from .modes import MODES, ModeSpec
    from .hardware import resolve_dtype, set_threads
    set_threads(a.threads)
    model, tok = load_model(a.model, dtype=resolve_dtype(a.dtype))
    if tok is None:
        raise PoEError("the checkpoint has no tokenizer; generation needs one")
    if a.compile or a.autotune:
        compile_decode(model, autotune=a.autotune)
    if any(not p for p in a.prompt):
        raise PoEError("--prompt is empty; give some text to continue")
    sampling = Sampling(do_sample=a.temperature > 0, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        seed=a.seed)
    if a.mode == "all":
        return _generate_all_modes(model, tok, a, sampling)
    try:
        spec = ModeSpec(a.mode, **{f.name: getattr(a, f.name, None) for f in MODES[a.mode].fields})
        spec.check(model)
    except PoEError as e:   # name the flag the user typed
        msg = str(e)
        for f in MODES[a.mode].fields:
            msg = msg.replace(f.name, f.flag, 1) if msg.startswith(f.name) else msg
        raise PoEError(msg) from None
    for p in a.prompt:
        print(p, end="", flush=True)
        text, gen, dt = _run_mode(model, tok, p, spec, a, sampling, echo=a.stream)
        print("" if a.stream else text)
        n = len(gen.tokens[0])
        info = f"[{a.mode}: {n} tokens, {n / dt:.1f} tok/s"
        if gen.stages_used:
            info += f", stages used {gen.stages_used[0]}"
        if gen.drafted:
            info += f", acceptance {gen.acceptance:.2f}"
        if gen.extra.get("plain_steps"):
            info += f", {gen.extra['plain_steps']} plain steps (drafting would not pay)"
        print(info + "]", file=sys.stderr)


def _run_mode(model, tok, prompt, spec, a, sampling, echo=False):
    """(text, Generation, seconds) for one prompt in one mode, printing text as it comes when echo."""
    import time
    from .textstream import stream_text
    from .modes import mode_steps
    t0 = time.perf_counter()
    steps, gen = mode_steps(model, [tok.encode(prompt)], spec, a.max_new_tokens, sampling, eos_token_id=tok.bos_id)
    text = []
    for _, delta, _ in stream_text(tok, steps, 1, stop=a.stop or (), eos_token_id=tok.bos_id):
        text.append(delta)
        if echo:
            print(delta, end="", flush=True)
    return "".join(text), gen, time.perf_counter() - t0


def _generate_all_modes(model, tok, a, sampling) -> None:
    """Each prompt in every mode of the table (its showcase settings), as a table."""
    from .modes import MODES
    specs = [c for mode in MODES.values() if sampling.greedy or not mode.greedy_only
             for c in mode.configurations(model.config, model.calibration)]
    for p in a.prompt:
        print(f"\n{p!r}")
        print(f"  {'mode':<34}{'tok/s':>8}{'layers/tok':>11}{'accept':>8}  text")
        for label, spec in specs:
            text, gen, dt = _run_mode(model, tok, p, spec, a, sampling)
            n = max(len(gen.tokens[0]), 1)
            layers = gen.extra.get("layers_per_token")        # WAND: lazy fills of skipped layers included
            if layers is None and spec.entry.static:
                layers = spec.entry.report(spec, gen, model.config, n)["layers_per_token"]
            layers = f"{layers:.2f}" if layers is not None else "-"
            accept = f"{gen.acceptance:.2f}" if gen.drafted else "-"
            shown = " ".join(text.split())[:70]
            print(f"  {label:<34}{n / dt:>8.1f}{layers:>11}{accept:>8}  {shown}")


def cmd_calibrate(a) -> None:
    from .checkpoint import load_model, read_meta, resolve_checkpoint
    from .data import TokenLoader
    from .fileio import write_json_atomic
    from .speculative import measure_draft_agreement
    from .wand import measure_bounds
    from .hardware import resolve_dtype, set_threads
    set_threads(a.threads)
    ckpt = resolve_checkpoint(a.model)
    model, _ = load_model(ckpt, dtype=resolve_dtype(a.dtype))
    T = model.config.sequence_len
    n_batches = max(1, a.tokens // (a.batch_size * T))
    loader = TokenLoader(a.data, "val", a.batch_size, T, case_aug_p=0.0)
    bounds = measure_bounds(model, loader.iter_batches(n_batches), quantile=a.quantile)
    loader = TokenLoader(a.data, "val", a.batch_size, T, case_aug_p=0.0)
    agreement = measure_draft_agreement(model, loader.iter_batches(n_batches))
    meta = read_meta(ckpt)
    meta["calibration"] = {**bounds, "speculative_agreement": agreement, "data": str(a.data)}
    write_json_atomic(ckpt / "meta.json", meta, indent=2)
    print(f"WAND p{100 * a.quantile:g} bounds per stage: " + ", ".join(f"{b:.3f}" for b in bounds["wand_p99_bounds"])
          + f" (over {bounds['positions']:,} positions)")
    print("draft agreement with full PoE by draft stage: " + ", ".join(f"s{k}: {v:.3f}" for k, v in agreement.items()))
    print(f"stored in {ckpt / 'meta.json'}")


def cmd_pack(a) -> None:
    import torch
    from .checkpoint import pack_checkpoint
    out = pack_checkpoint(a.checkpoint, a.out, {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype])
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"packed {a.checkpoint} into {out} ({size / 1e6:.1f} MB, {a.dtype})")


def cmd_plan(a) -> None:
    from .config import PoEConfig
    from .plan import format_plan, make_plan
    cfg = PoEConfig.from_depth(a.depth) if a.depth else PoEConfig.from_preset(a.preset)
    if a.gpus < 1 or a.gpu_mem <= 0:
        raise PoEError("--gpus must be >= 1 and --gpu-mem > 0")
    p = make_plan(cfg, a.gpus, a.gpu_mem, a.tokens_per_step, a.steps, a.mfu, a.gpu_tflops)
    print(format_plan(cfg, p, a.gpus, a.gpu_mem, a.tokens_per_step, a.steps, a.mfu, a.gpu_tflops))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poegpt", description="GPTs trained as a Product of Experts over depth")
    sub = p.add_subparsers(dest="command", required=True)
    add_env_parser(sub)
    add_info_parser(sub)
    add_tokenizer_parser(sub)
    from .corpus import add_corpus_parser
    add_corpus_parser(sub)
    from .integrations.hf.export import add_export_parser
    add_export_parser(sub)
    from .nanochat import add_parsers
    add_parsers(sub)
    from .serving import add_serve_parser
    add_serve_parser(sub)
    add_prepare_parser(sub)
    add_train_parser(sub)
    add_adapt_parser(sub)
    add_eval_parser(sub)
    add_generate_parser(sub)
    add_calibrate_parser(sub)
    add_pack_parser(sub)
    add_plan_parser(sub)
    return p


def add_env_parser(sub) -> None:
    s = sub.add_parser("env", help="the CPU, its flags, torch's capability, threads, CUDA, and the dtype auto picks")
    s.set_defaults(fn=cmd_env)


def add_info_parser(sub) -> None:
    s = sub.add_parser("info", help="config, parameter count and FLOPs of a preset, depth or checkpoint")
    s.add_argument("--preset", help="a named config: tiny, small, demo, 1.5b")
    s.add_argument("--depth", type=int, help="a nanochat-style config of this many layers (instead of --preset)")
    s.add_argument("--vocab-size", type=int, help="vocabulary size for --preset/--depth (default: the preset's)")
    s.add_argument("--model", help="checkpoint or run directory ('demo': the shipped demo model)")
    s.set_defaults(fn=cmd_info)


def add_tokenizer_parser(sub) -> None:
    s = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    s.add_argument("--recipe", default="sample", help="mixture recipe (name or JSON path) whose local sources to read")
    s.add_argument("--input", nargs="*", help="text files to train on instead of a recipe")
    s.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included (default %(default)s)")
    s.add_argument("--max-chars", type=int, default=None, help="read at most this many characters (default: all)")
    s.add_argument("--out", required=True, help="directory to write the tokenizer to")
    s.set_defaults(fn=cmd_tokenizer)


def add_prepare_parser(sub) -> None:
    s = sub.add_parser("prepare", help="tokenise a mixture into shards + manifest")
    s.add_argument("--recipe", default="sample", help="mixture recipe: a name in poegpt/recipes or a JSON path (default %(default)s)")
    s.add_argument("--tokenizer", required=True, help="directory holding tokenizer_bpe.json")
    s.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    s.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: the whole mixture)")
    s.add_argument("--seed", type=int, default=0, help="shuffling seed (default %(default)s)")
    s.set_defaults(fn=cmd_prepare)


def _train_help(text: str, field: str) -> str:
    """Help for a train flag whose argparse default is None (unset fields keep TrainArgs'), with TrainArgs' default."""
    from .train import TrainArgs
    return f"{text} (default {getattr(TrainArgs, field)})".replace("%", "%%")


def add_train_parser(sub) -> None:
    s = sub.add_parser("train", help="train a PoE model (resumable)")
    s.add_argument("--data", help="prepared data directory (poegpt prepare --out); taken from the run when resuming")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, bpb.png")
    s.add_argument("--preset", help=_train_help("config preset: tiny, small, demo, 1.5b", "preset"))
    s.add_argument("--depth", type=int, help="a nanochat-style config of this many layers (instead of --preset)")
    s.add_argument("--sequence-len", dest="sequence_len", type=int, help="context length (default: the preset's)")
    s.add_argument("--objective", choices=["residual_logop", "joint_logop", "independent", "final_only"],
                   help=_train_help("training objective of the stage heads", "objective"))
    s.add_argument("--local-weight", dest="local_weight", type=float, help=_train_help("weight of each stage own CE loss", "local_weight"))
    s.add_argument("--stage-grad", dest="stage_grad", choices=["through", "isolated"],
                   help=_train_help("isolated: detach the input of each stage (true local learning)", "stage_grad"))
    s.add_argument("--steps", type=int, help=_train_help("optimiser steps", "steps"))
    _add_loop_flags(s)
    s.add_argument("--parallel", choices=["ddp", "fsdp", "stage"],
                   help="under torchrun: ddp / fsdp data parallelism (default ddp), or stage: one rank per stage")
    s.set_defaults(fn=cmd_train)


def add_adapt_parser(sub) -> None:
    s = sub.add_parser("adapt", help="train the PoE stage heads of a model (e.g. an imported nanochat one) on its "
                                     "frozen trunk (resumable)")
    s.add_argument("--model", dest="init_from", help="checkpoint or run directory to start from (import-nanochat's OUT)")
    s.add_argument("--data", help="prepared data directory, tokenised with the model's tokenizer "
                                  "(poegpt prepare --tokenizer MODEL)")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, bpb.png")
    s.add_argument("--stages", dest="layout", help="re-cut the stage layout, layers per stage, e.g. 12,5,4,3 (a model "
                                                   "with zero stage heads only; default: the model's)")
    s.add_argument("--train", dest="trainable", help="what trains: heads (stages 0..K-2's additive heads; the "
                   "shared head, the last stage's head and the trunk stay, so stage K-1 is unchanged), "
                   "heads+last-layers (and each stage's last layer) or all (default heads)")
    s.add_argument("--sequence-len", dest="sequence_len", type=int,
                   help="tokens per training row, at most the model's context (default: the context)")
    s.add_argument("--steps", type=int, help=_train_help("optimiser steps", "steps"))
    _add_loop_flags(s)
    s.set_defaults(fn=cmd_adapt)


def _add_loop_flags(s) -> None:
    """The training loop's flags that train and adapt share."""
    s.add_argument("--batch-size", dest="batch_size", type=int, help=_train_help("rows per micro-batch", "batch_size"))
    s.add_argument("--tokens-per-step", dest="tokens_per_step", type=int,
                   help="tokens per optimiser step, by gradient accumulation (default: one micro-batch)")
    s.add_argument("--warmup-steps", dest="warmup_steps", type=int, help=_train_help("linear learning-rate warm-up steps", "warmup_steps"))
    s.add_argument("--warmdown-ratio", dest="warmdown_ratio", type=float,
                   help=_train_help("share of the steps at the end with a linear decay to 0", "warmdown_ratio"))
    s.add_argument("--matrix-lr", dest="matrix_lr", type=float, help=_train_help("Muon learning rate of the 2-D weights", "matrix_lr"))
    s.add_argument("--unembedding-lr", dest="unembedding_lr", type=float, help=_train_help("AdamW learning rate of the heads", "unembedding_lr"))
    s.add_argument("--embedding-lr", dest="embedding_lr", type=float, help=_train_help("AdamW learning rate of the embeddings", "embedding_lr"))
    s.add_argument("--eval-every", dest="eval_every", type=int, help=_train_help("validation BPB every N steps", "eval_every"))
    s.add_argument("--eval-tokens", dest="eval_tokens", type=int, help=_train_help("validation tokens per evaluation", "eval_tokens"))
    s.add_argument("--save-every", dest="save_every", type=int, help=_train_help("atomic checkpoint every N steps", "save_every"))
    s.add_argument("--keep", type=int, help=_train_help("checkpoints kept (older ones are deleted)", "keep"))
    s.add_argument("--seed", type=int, help=_train_help("seed of init and data order", "seed"))
    s.add_argument("--case-aug-p", dest="case_aug_p", type=float,
                   help=_train_help("probability of a case-augmented document", "case_aug_p"))
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp64"],
                   help="compute dtype (default auto: bf16 where the hardware has it natively, else fp32)")
    s.add_argument("--threads", type=int, help="torch intra-op threads (default: the cores, shared by local ranks)")
    s.add_argument("--device", help=_train_help("cpu, cuda, cuda:N or auto", "device"))
    s.add_argument("--loss-chunk", dest="loss_chunk", type=int, help=_train_help("positions per chunk of the stage-head loss", "loss_chunk"))
    s.add_argument("--compile-loss", dest="compile_loss", action="store_true", default=None,
                   help="torch.compile the chunked stage-head loss (fuses the vocabulary-wide element-wise work)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("--stop-at", dest="stop_at", type=int, help="stop (and save) after this step; resume later")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_parser(sub) -> None:
    s = sub.add_parser("eval", help="the card's evaluation table, written under --out")
    s.add_argument("--model", help="checkpoint or run directory (default: the shipped demo model)")
    s.add_argument("--data", required=True, help="prepared data directory whose validation stream is scored")
    s.add_argument("--prompts", help="JSONL of {prompt, target} for prompt target ranks")
    s.add_argument("--tokens", type=int, default=131_072, help="validation tokens to score (default %(default)s)")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="rows per forward pass (default %(default)s)")
    s.add_argument("--alpha", type=float, default=1.0, help="entropy-weighting alpha for the entropy-weighted BPB")
    s.add_argument("--out", default="eval", help="directory for report.json, metrics.csv and plots (default %(default)s)")
    add_compute_flags(s)
    s.set_defaults(fn=cmd_eval)


def add_generate_parser(sub) -> None:
    s = sub.add_parser("generate", help="continue prompts in any of the six PoE modes")
    s.add_argument("--model", help="checkpoint or run directory (default: the shipped demo model)")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    add_mode_flags(s)
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64, help="tokens to generate per prompt (default %(default)s)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", dest="top_k", type=int, help="sample from the k most likely tokens (default: all)")
    s.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling mass (default: 1, off)")
    s.add_argument("--seed", type=int, help="sampling seed (default: unseeded)")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--stream", action="store_true", help="print text as it is generated")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute dtype of the weights (default auto: bf16 where native, else fp32)")
    s.add_argument("--threads", type=int, help="torch intra-op threads (default: the usable cores)")
    s.add_argument("--compile", action="store_true",
                   help="the fast decode path (poegpt.engine.compile_decode): fixed-shape compiled steps for every "
                        "mode (WAND: its deep step); pays for long generations (each step shape compiles once, seconds)")
    s.add_argument("--autotune", action="store_true",
                   help="--compile with inductor's max_autotune and freezing: decode passes ~30-40%% faster on the "
                        "demo model (bf16 CPU), each step shape compiles ~10x longer")
    s.set_defaults(fn=cmd_generate)


def add_compute_flags(p) -> None:
    """--dtype and --threads of the commands that run a loaded model (eval, calibrate)."""
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp64"], default="auto",
                   help="compute dtype (default auto: bf16 where the hardware has it natively, else fp32)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the usable cores)")


def add_mode_flags(p) -> None:
    """--mode and one flag per field of the mode table (`modes.MODES`), each saying which modes take it."""
    from .modes import MODES, field_owners
    p.add_argument("--mode", choices=[*MODES, "all"], default="full",
                   help="the inference mode (all: every mode with its showcase options, as a table; default %(default)s)")
    fields = {f.name: f for mode in MODES.values() for f in mode.fields}
    kinds = {"int": dict(type=int), "float": dict(type=float), "ints": dict(type=int, nargs="+"),
             "floats": dict(type=float, nargs="+"), "int_or_auto": dict()}
    for name, owners in field_owners().items():
        f = fields[name]
        default = "" if f.default is None else f" (default {f.default})"
        kind = dict(metavar="{" + ",".join(f.choices) + "}") if f.kind == "choice" else kinds[f.kind]
        p.add_argument(f.flag, dest=name, help=f"{', '.join(owners)}: {f.help}{default}", **kind)


def add_calibrate_parser(sub) -> None:
    s = sub.add_parser("calibrate", help="measure WAND bounds and speculative thresholds; store them in the checkpoint")
    s.add_argument("--model", help="checkpoint or run directory (its newest checkpoint is updated)")
    s.add_argument("--data", required=True, help="prepared data directory to calibrate on (its validation stream)")
    s.add_argument("--tokens", type=int, default=65_536, help="tokens to measure on (default %(default)s)")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="rows per forward pass (default %(default)s)")
    s.add_argument("--quantile", type=float, default=0.99, help="quantile of the WAND bounds (default %(default)s)")
    add_compute_flags(s)
    s.set_defaults(fn=cmd_calibrate)


def add_pack_parser(sub) -> None:
    s = sub.add_parser("pack", help="a slim inference checkpoint (weights in bf16, no optimiser state)")
    s.add_argument("checkpoint", help="checkpoint or run directory (its newest checkpoint)")
    s.add_argument("out", help="directory of the slim checkpoint")
    s.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="stored weight dtype (default %(default)s)")
    s.set_defaults(fn=cmd_pack)


def add_plan_parser(sub) -> None:
    s = sub.add_parser("plan", help="memory, micro-batch, FLOPs and GPU-hours of a training run")
    s.add_argument("--preset", default="1.5b", help="config preset (default %(default)s)")
    s.add_argument("--depth", type=int, help="a nanochat-style config of this many layers (instead of --preset)")
    s.add_argument("--gpus", type=int, default=8, help="number of GPUs (default %(default)s)")
    s.add_argument("--gpu-mem", dest="gpu_mem", type=float, default=80.0, help="GB per GPU")
    s.add_argument("--tokens-per-step", dest="tokens_per_step", type=int, default=1_048_576, help="tokens per optimiser step (default %(default)s)")
    s.add_argument("--steps", type=int, default=60_000, help="optimiser steps (default %(default)s)")
    s.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default %(default)s)")
    s.add_argument("--gpu-tflops", dest="gpu_tflops", type=float, default=989.0, help="peak bf16 TFLOP/s per GPU")
    s.set_defaults(fn=cmd_plan)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except PoEError as e:
        print(f"poegpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poegpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
