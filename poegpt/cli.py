"""The `poegpt` command: a thin argparse layer over the package (SPEC §12).

    poegpt info      --preset 1.5b | --depth 12 | --model PATH
    poegpt tokenizer --recipe sample --vocab-size 4096 --out DIR
    poegpt prepare   --recipe sample --tokenizer DIR --out DATA
    poegpt train     --data DATA --out RUN [--preset tiny | --depth N] [--objective ...] [--resume]
    poegpt eval      --model RUN --data DATA [--prompts FILE] [--out eval]
    poegpt generate  --model RUN --prompt "..." [--max-new-tokens 64] [--temperature 0.8 --seed 0]

A user error is one line on stderr (`poegpt: error: ...`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .errors import PoEError


def cmd_info(a) -> None:
    import torch
    from .config import PoEConfig
    from .model import PoEGPT
    if a.model:
        from .checkpoint import resolve_checkpoint
        cfg = PoEConfig.load(resolve_checkpoint(a.model))
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


def cmd_tokenizer(a) -> None:
    from .data import load_mixture, read_documents
    from .tokenizer import Tokenizer, train_from_files
    if a.input:
        tok = train_from_files(a.input, a.vocab_size, max_chars=a.max_chars)
    else:
        mixture = load_mixture(a.recipe)

        def texts():
            budget = a.max_chars
            for src in mixture.sources:
                if not src.is_local:
                    raise PoEError(f"source {src.name!r} is not local; tokenizer training reads local sources only")
                for doc in read_documents(src):
                    if budget is not None:
                        if budget <= 0:
                            return
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
    from .train import TrainArgs, resume_args, train
    from .checkpoint import checkpoints_in
    if a.resume and checkpoints_in(a.out):
        args = resume_args(a.out, steps=a.steps, progress=not a.quiet)
    else:
        if not a.data:
            raise PoEError("--data is required (a directory written by `poegpt prepare`)")
        fields = {f.name for f in dataclasses.fields(TrainArgs)}
        given = {k: v for k, v in vars(a).items() if k in fields and v is not None}
        given["progress"] = not a.quiet
        if a.depth is not None:
            given["preset"] = None
        args = TrainArgs(**given)
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
    model, tok = load_model(a.model)
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
    import torch
    from .checkpoint import load_model
    model, tok = load_model(a.model)
    if tok is None:
        raise PoEError("the checkpoint has no tokenizer; generation needs one")
    if not a.prompt:
        raise PoEError("--prompt is empty; give some text to continue")
    for i, p in enumerate(a.prompt):
        ids = torch.tensor([tok.encode(p)])
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                             temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                             seed=None if a.seed is None else a.seed + i, eos_token_id=tok.bos_id)
        decoder = tok.stream_decoder()  # a character cut off by the length limit is held back, not garbled
        text = "".join(decoder.push(t) for t in out[0, ids.size(1):].tolist())
        print(f"{p}{text}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poegpt", description="GPTs trained as a Product of Experts over depth")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="config, parameter count and FLOPs of a preset, depth or checkpoint")
    s.add_argument("--preset")
    s.add_argument("--depth", type=int)
    s.add_argument("--vocab-size", type=int)
    s.add_argument("--model", help="checkpoint or run directory")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    s.add_argument("--recipe", default="sample", help="mixture recipe (name or JSON path) whose local sources to read")
    s.add_argument("--input", nargs="*", help="text files to train on instead of a recipe")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--max-chars", type=int, default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_tokenizer)

    s = sub.add_parser("prepare", help="tokenise a mixture into shards + manifest")
    s.add_argument("--recipe", default="sample")
    s.add_argument("--tokenizer", required=True, help="directory holding tokenizer_bpe.json")
    s.add_argument("--out", required=True)
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("train", help="train a PoE model (resumable)")
    s.add_argument("--data")
    s.add_argument("--out", required=True)
    s.add_argument("--preset")
    s.add_argument("--depth", type=int)
    s.add_argument("--sequence-len", dest="sequence_len", type=int)
    s.add_argument("--objective", choices=["residual_logop", "joint_logop", "independent", "final_only"])
    s.add_argument("--local-weight", dest="local_weight", type=float)
    s.add_argument("--stage-grad", dest="stage_grad", choices=["through", "isolated"])
    s.add_argument("--steps", type=int)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--tokens-per-step", dest="tokens_per_step", type=int)
    s.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    s.add_argument("--warmdown-ratio", dest="warmdown_ratio", type=float)
    s.add_argument("--matrix-lr", dest="matrix_lr", type=float)
    s.add_argument("--unembedding-lr", dest="unembedding_lr", type=float)
    s.add_argument("--embedding-lr", dest="embedding_lr", type=float)
    s.add_argument("--eval-every", dest="eval_every", type=int)
    s.add_argument("--eval-tokens", dest="eval_tokens", type=int)
    s.add_argument("--save-every", dest="save_every", type=int)
    s.add_argument("--keep", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--case-aug-p", dest="case_aug_p", type=float)
    s.add_argument("--dtype", choices=["fp32", "bf16"])
    s.add_argument("--device")
    s.add_argument("--loss-chunk", dest="loss_chunk", type=int)
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("--stop-at", dest="stop_at", type=int, help="stop (and save) after this step; resume later")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="the card's evaluation table, written under --out")
    s.add_argument("--model", help="checkpoint or run directory (default: the shipped demo model)")
    s.add_argument("--data", required=True)
    s.add_argument("--prompts", help="JSONL of {prompt, target} for prompt target ranks")
    s.add_argument("--tokens", type=int, default=131_072)
    s.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    s.add_argument("--alpha", type=float, default=1.0, help="entropy-weighting alpha for the entropy-weighted BPB")
    s.add_argument("--out", default="eval")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("generate", help="continue prompts with the model")
    s.add_argument("--model")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--mode", choices=["full"], default="full")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", dest="top_k", type=int)
    s.add_argument("--top-p", dest="top_p", type=float)
    s.add_argument("--seed", type=int)
    s.set_defaults(fn=cmd_generate)
    return p


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
