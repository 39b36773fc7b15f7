"""Training loop (docs/design.md §6): one process on a CPU or GPU; `--resume` continues bit for bit.

Each step accumulates gradients over micro-batches until `tokens_per_step` tokens, then steps
Muon + AdamW on nanochat's schedule. Every `eval_every` steps it measures validation BPB per stage,
per prefix and for full PoE; every `save_every` steps it writes an atomic checkpoint holding the
model, optimiser, schedule position, data position and every RNG state. Metrics go to
`<out>/metrics.jsonl` and a plot to `<out>/bpb.png`.

A run can be cut into chunks (`stop_at`): each invocation trains up to that step, saves and exits;
`resume` picks the newest complete checkpoint and carries on with the saved arguments.

A run may start from a checkpoint instead of a fresh init (`init_from`, with its config and an
optional re-cut of the stage layout) and train only part of the model (`trainable`, see
`optim.freeze`): this is `poegpt adapt` (adapt.py), the same loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (checkpoints_in, load_initial_state, load_state, load_training_state, prune_checkpoints,
                         read_meta, write_checkpoint, STEP_PREFIX)
from .distributed import DistInfo, all_reduce_mean, barrier, full_state, init_distributed, parallelize
from .config import PoEConfig
from .errors import PoEError
from .evaluate import stream_metrics
from .hardware import resolve_dtype_name, set_threads
from .model import PoEModel
from .objectives import PoELoss
from .optim import build_optimizers, check_trainable, freeze, set_schedule


@dataclass
class TrainArgs:
    data: str                                   # prepared data directory (poegpt prepare)
    out: str                                    # run directory: checkpoints/, metrics.jsonl, bpb.png
    preset: str | None = "tiny"                 # or depth
    depth: int | None = None
    sequence_len: int | None = None             # override the preset's context (init_from: the row length, <= its context)
    objective: str = "residual_logop"
    local_weight: float = 0.0
    stage_grad: str = "through"
    steps: int = 200
    batch_size: int = 8                         # rows per micro-batch
    tokens_per_step: int | None = None          # default: one micro-batch
    warmup_steps: int = 0
    warmdown_ratio: float = 0.2
    matrix_lr: float = 0.02
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    eval_every: int = 100
    eval_tokens: int = 65_536
    save_every: int = 100
    keep: int = 2
    seed: int = 0
    case_aug_p: float = 0.15
    dtype: str = "auto"                         # auto (bf16 where native, else fp32) | fp32 | bf16 (autocast) | fp64
    threads: int | None = None                  # torch intra-op threads (None: the cores shared by the local ranks)
    device: str = "auto"
    loss_chunk: int = 4096
    compile_loss: bool = False                  # torch.compile the chunked loss (2.2x on CPU at V=8192)
    parallel: str = "ddp"                       # under torchrun: ddp | fsdp
    progress: bool = True
    init_from: str | None = None                # start from this checkpoint (or run): its weights and config
    stages: list[int] | None = None             # with init_from: re-cut its stage layout
    trainable: str = "all"                      # all | heads | heads+last-layers (optim.freeze)

    def model_config(self, tokenizer) -> PoEConfig:
        """The config of a new run: the preset's or depth's, or the init checkpoint's (tokenizer checked)."""
        overrides = dict(objective=self.objective, local_weight=self.local_weight, stage_grad=self.stage_grad)
        if self.init_from:
            from .checkpoint import initial_config
            return initial_config(self.init_from, tokenizer, self.data, self.stages, **overrides)
        overrides["vocab_size"] = tokenizer.vocab_size
        if self.sequence_len:
            overrides["sequence_len"] = self.sequence_len
        if self.depth is not None:
            return PoEConfig.from_depth(self.depth, **overrides)
        return PoEConfig.from_preset(self.preset or "tiny", **overrides)

    def row_len(self, cfg: PoEConfig) -> int:
        """Tokens per training row: the model's context, or fewer (a run started from a checkpoint)."""
        n = self.sequence_len or cfg.sequence_len
        if n > cfg.sequence_len:
            raise PoEError(f"--sequence-len {n} is longer than the model's context of {cfg.sequence_len}")
        return n


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PoEError("--device cuda asked but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    if dtype not in ("fp32", "bf16", "fp64"):
        raise PoEError(f"--dtype must be fp32, bf16 or fp64, got {dtype!r} (fp16 is not supported)")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def measure_peak_flops(device: torch.device, dtype: str, n: int = 1024) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype (used as MFU's denominator)."""
    dt = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(dtype, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ a
    reps = 8
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def validation_metrics(model, args: TrainArgs, tokenizer, token_bytes, device, amp, root=None) -> dict:
    """Validation BPB and friends; `root` is the module FSDP sharded (the step module), gathered here."""
    from .data import TokenLoader
    T = args.row_len(model.config)
    loader = TokenLoader(args.data, "val", args.batch_size, T, case_aug_p=0.0)
    n_batches = max(1, args.eval_tokens // (args.batch_size * T))
    batches = (tuple(t.to(device) for t in b) for b in loader.iter_batches(n_batches))
    model.eval()
    root = model if root is None else root
    sharded = hasattr(root, "unshard")           # FSDP2: evaluation calls the trunk, not forward, so gather the root
    if sharded:
        root.unshard()
    with amp:
        m = stream_metrics(model, batches, token_bytes)
    if sharded:
        root.reshard()
    model.train()
    return m


def plot_metrics(run_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in rows if "val" in r]
    train = [r for r in rows if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
        axes[0].set_xlabel("step"); axes[0].set_ylabel("training loss (objective)"); axes[0].set_title("training loss")
    if evals:
        steps = [r["step"] for r in evals]
        K = len(evals[0]["val"]["bpb"]["stages"])
        for k in range(K):
            axes[1].plot(steps, [r["val"]["bpb"]["stages"][k] for r in evals], marker=".", label=f"stage {k}")
        axes[1].plot(steps, [r["val"]["bpb"]["full"] for r in evals], marker="o", color="k", label="full PoE")
        axes[1].set_xlabel("step"); axes[1].set_ylabel("validation BPB"); axes[1].legend()
        axes[1].set_title("validation bits per byte")
    fig.tight_layout()
    fig.savefig(run_dir / "bpb.png", dpi=110)
    plt.close(fig)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop log rows past the checkpoint (the run will write them again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def resume_args(run_dir, steps: int | None = None, progress: bool = True) -> TrainArgs:
    """The arguments a run was started with (from its newest checkpoint), optionally with a new length."""
    ckpts = checkpoints_in(run_dir)
    if not ckpts:
        raise PoEError(f"{run_dir} holds no checkpoint to resume from; start it without --resume")
    saved = read_meta(ckpts[-1])["train_args"]
    saved["progress"] = progress
    if steps is not None:
        saved["steps"] = steps
    return TrainArgs(**saved)


def train(args: TrainArgs, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train (or resume) a run; returns the last metrics row."""
    run = _start(args, resume, stop_at)
    row: dict = {}
    run.model.train()
    while run.step < run.end:
        row = _train_step(run)
        run.progress.step(row)
        _gather_evaluate_save(run)
    run.progress.close()
    return {**row, "val": run.last_val, "step": run.step}


@dataclass
class _Run:
    """A run in progress: built by `_start`, advanced one optimiser step at a time by `_train_step`."""
    args: TrainArgs
    run_dir: Path
    metrics_path: Path
    info: DistInfo
    device: torch.device
    cfg: PoEConfig
    tokenizer: object
    model: PoEModel                             # the module (checkpoints, evaluation)
    step_model: object                          # what a step calls: the module wrapped for DDP / FSDP
    stage_parallel: bool
    optimizers: list
    loader: object
    accum: int                                  # micro-batches per optimiser step
    tokens_per_step: int
    step: int
    last_val: dict | None
    token_bytes: torch.Tensor
    amp: object
    flops_per_token: float
    peak: float                                 # measured FLOP/s: MFU's denominator
    end: int                                    # the step this invocation stops after
    progress: "_Progress"


def _start(args: TrainArgs, resume: bool, stop_at: int | None) -> _Run:
    """Everything before the first step: checks, device and ranks, model, optimisers, data, and the
    state of the newest checkpoint when resuming."""
    from .data import TokenLoader
    from .tokenizer import Tokenizer
    run_dir = Path(args.out)
    latest = _latest_checkpoint(run_dir, resume)
    if args.steps < 1 or args.batch_size < 1:
        raise PoEError("--steps and --batch-size must be >= 1")
    check_trainable(args.trainable)
    device, info, dtype = _device_and_ranks(args)
    tokenizer = Tokenizer.load(args.data)
    resumed_from_init = latest is not None and args.init_from   # its config is the run's (the init may be gone)
    cfg = PoEConfig.load(latest) if resumed_from_init else args.model_config(tokenizer)
    tokens_per_step, accum = _accumulation(args, cfg, info.world_size)
    model, step_model, stage_parallel = _build_model(args, cfg, info, device, dtype, latest)
    optimizers = build_optimizers(model, matrix_lr=args.matrix_lr, unembedding_lr=args.unembedding_lr,
                                  embedding_lr=args.embedding_lr)
    loader = TokenLoader(args.data, "train", args.batch_size, args.row_len(cfg), tokenizer=tokenizer,
                         case_aug_p=args.case_aug_p, seed=args.seed,  # stage ranks share each micro-batch
                         rank=0 if stage_parallel else info.rank, world_size=1 if stage_parallel else info.world_size)
    step, last_val = 0, None
    if latest is not None:
        meta = load_training_state(latest, model, optimizers)
        loader.load_state_dict(meta["data_state"])
        step, last_val = meta["step"], meta.get("val")
    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        _start_metrics(run_dir, metrics_path, resumed_at=None if latest is None else step)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)
    amp = autocast_for(device, dtype)
    flops_per_token = train_flops_per_token(model, args.trainable)
    peak = measure_peak_flops(device, dtype)
    end = args.steps if stop_at is None else min(stop_at, args.steps)
    progress = _Progress(args.progress and info.is_main, step, end, args.steps, "adapt" if args.init_from else "train")
    return _Run(args=args, run_dir=run_dir, metrics_path=metrics_path, info=info, device=device, cfg=cfg,
                tokenizer=tokenizer, model=model, step_model=step_model, stage_parallel=stage_parallel,
                optimizers=optimizers, loader=loader, accum=accum, tokens_per_step=tokens_per_step, step=step,
                last_val=last_val, token_bytes=token_bytes, amp=amp, flops_per_token=flops_per_token, peak=peak,
                end=end, progress=progress)


def _latest_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); a run that has some needs `resume`."""
    ckpts = checkpoints_in(run_dir)
    if ckpts and not resume:
        raise PoEError(f"{run_dir} already holds checkpoints; pass --resume to continue, or choose a new --out")
    return ckpts[-1] if ckpts else None


def _device_and_ranks(args: TrainArgs):
    """(device, distributed info, dtype name): this rank's device, torchrun's ranks, threads set."""
    device = resolve_device(args.device)
    info = init_distributed(device.type)
    dtype = resolve_dtype_name(args.dtype, device, warn=args.dtype != "fp16")  # fp16: autocast_for says no
    set_threads(args.threads)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return device, info, dtype


def _accumulation(args: TrainArgs, cfg: PoEConfig, world_size: int) -> tuple[int, int]:
    """(tokens per optimiser step, micro-batches per step on each rank)."""
    data_ranks = 1 if args.parallel == "stage" else world_size
    micro_tokens = args.batch_size * args.row_len(cfg) * data_ranks        # one micro-step over all ranks
    tokens_per_step = args.tokens_per_step or micro_tokens
    if tokens_per_step % micro_tokens:
        raise PoEError(f"--tokens-per-step ({tokens_per_step}) must be a multiple of batch_size × sequence_len × "
                       f"ranks ({micro_tokens})")
    return tokens_per_step, tokens_per_step // micro_tokens


def _build_model(args: TrainArgs, cfg: PoEConfig, info: DistInfo, device, dtype: str, latest: Path | None):
    """(model, the module a step calls, stage_parallel): seeded init, the checkpoint's weights when
    resuming, then the parallel wrapping under torchrun."""
    torch.manual_seed(args.seed)
    model = PoEModel(cfg).to(device, torch.float64 if dtype == "fp64" else torch.float32)
    if latest is not None:
        load_state(latest, model)
    elif args.init_from:
        load_initial_state(args.init_from, model)
    freeze(model, args.trainable)
    stage_parallel = args.parallel == "stage" and info.enabled
    if stage_parallel:
        from .stage_parallel import check_stage_parallel
        check_stage_parallel(model, info.world_size)
        return model, model, True
    step_model = parallelize(PoELoss(model), args.parallel, info)   # what the step calls; `model` stays the module
    return model, step_model, False


def train_flops_per_token(model: PoEModel, trainable: str) -> float:
    """Training FLOPs per token (MFU's numerator): forward + backward when everything trains; with the
    trunk frozen ("heads") the forward plus the trained heads' weight gradients, as no gradient goes
    back through the trunk. heads+last-layers is counted as a full backward (an overcount)."""
    if trainable != "heads":
        return model.train_flops_per_token()
    cfg = model.config
    return model.flops_per_token(training=True) / 3 + 2 * (cfg.n_stages - 1) * cfg.padded_vocab_size * cfg.n_embd


def _start_metrics(run_dir: Path, metrics_path: Path, resumed_at: int | None) -> None:
    """Create the run directory; a new run starts a fresh metrics log, a resumed one drops rows past its checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed_at is not None:
        _truncate_metrics(metrics_path, resumed_at)
    elif metrics_path.exists():
        metrics_path.unlink()


def _append_metrics(run: _Run, row: dict) -> None:
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _train_step(run: _Run) -> dict:
    """One optimiser step over `accum` micro-batches; returns its metrics row (logged by the main rank)."""
    args = run.args
    t0 = time.perf_counter()
    lr_mult = set_schedule(run.optimizers, run.step, args.steps, args.warmup_steps, args.warmdown_ratio)
    loss_sum, stage_sum = _accumulate_gradients(run)
    for opt in run.optimizers:
        opt.step()
    run.model.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t0
    tok_s = run.tokens_per_step / dt
    row = {"step": run.step, "loss": loss_sum, "stage_ce": stage_sum.tolist(), "lr_mult": lr_mult,
           "tokens": run.step * run.tokens_per_step, "tok_s": tok_s, "mfu": run.flops_per_token * tok_s / run.peak}
    if run.info.is_main:
        _append_metrics(run, row)
    return row


def _accumulate_gradients(run: _Run) -> tuple[float, torch.Tensor]:
    """Forward and backward over `accum` micro-batches; (loss, per-stage CE), averaged over them and the ranks."""
    args, cfg, accum = run.args, run.cfg, run.accum
    if run.stage_parallel:
        from .stage_parallel import all_reduce_shared_grads, stage_loss_step
    loss_sum, stage_sum = 0.0, None
    for _ in range(accum):
        x, y = (t.to(run.device) for t in run.loader.next_batch())
        with run.amp:
            if run.stage_parallel:   # this rank's stage only; it runs its own backward
                loss = stage_loss_step(run.model, x, y, scale=1 / accum) * cfg.n_stages
                stage_ce = torch.full((cfg.n_stages,), float("nan"))
            else:
                loss, stage_ce = run.step_model(x, y, loss_chunk=args.loss_chunk, compile_loss=args.compile_loss)
                (loss / accum).backward()
        loss_sum += loss.detach() / accum
        stage_sum = stage_ce / accum if stage_sum is None else stage_sum + stage_ce / accum
    if run.stage_parallel:
        all_reduce_shared_grads(run.model)
    loss_sum = all_reduce_mean(loss_sum).item()      # stage ranks: the mean of K terms x K = their sum
    stage_sum = all_reduce_mean(stage_sum)
    if not math.isfinite(loss_sum):
        raise PoEError(f"the loss became {loss_sum} at step {run.step}; lower the learning rates or use fp32")
    return loss_sum, stage_sum


def _gather_evaluate_save(run: _Run) -> None:
    """After a step: validation every `eval_every` steps and at the last, a checkpoint every
    `save_every` steps and where this invocation stops (stage ranks first gather the whole model)."""
    args, step = run.args, run.step
    if run.stage_parallel and (step % args.eval_every == 0 or step % args.save_every == 0 or step == run.end):
        from .stage_parallel import gather_owned
        gather_owned(run.model)
    if step % args.eval_every == 0 or step == args.steps:
        _evaluate(run)
    if step % args.save_every == 0 or step == run.end:
        _save(run)


def _evaluate(run: _Run) -> None:
    """Validation metrics (on every rank, for FSDP), logged and plotted by the main rank."""
    run.last_val = validation_metrics(run.model, run.args, run.tokenizer, run.token_bytes, run.device, run.amp,
                                      run.step_model)
    if run.info.is_main:
        _append_metrics(run, {"step": run.step, "val": run.last_val})
        run.progress.validation(run.step, run.last_val)
        plot_metrics(run.run_dir)


def _save(run: _Run) -> None:
    """An atomic checkpoint of everything resume needs; older ones beyond `keep` are pruned."""
    model_state, optim_state = full_state(run.model, run.optimizers)           # collective under FSDP
    if run.info.is_main:
        meta = {"step": run.step, "data_state": run.loader.state_dict(), "train_args": dataclasses.asdict(run.args),
                "val": run.last_val, "tokens": run.step * run.tokens_per_step, "world_size": run.info.world_size}
        write_checkpoint(run.run_dir / "checkpoints" / f"{STEP_PREFIX}{run.step:06d}", run.cfg, model_state,
                         run.tokenizer, meta, optim_state)
        prune_checkpoints(run.run_dir, run.args.keep)
    barrier()


class _Progress:
    """A bar on a terminal, plain log lines in a log file; nothing unless `enabled` (args.progress, main rank)."""

    def __init__(self, enabled: bool, step: int, end: int, steps: int, desc: str = "train"):
        from tqdm import tqdm
        self.log = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=end, initial=step, disable=not self.interactive, desc=desc, dynamic_ncols=True)
        self.every = max(1, (end - step) // 20)
        self.end, self.steps = end, steps

    def step(self, row: dict) -> None:
        step, loss, tok_s, mfu = row["step"], row["loss"], row["tok_s"], row["mfu"]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
        if self.log and not self.interactive and (step % self.every == 0 or step == self.end):
            print(f"step {step}/{self.steps} | loss {loss:.4f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}%",
                  flush=True)

    def validation(self, step: int, val: dict) -> None:
        if self.log:
            self.bar.write(f"step {step}: val BPB full {val['bpb']['full']:.4f} | stages "
                           + " ".join(f"{b:.4f}" for b in val["bpb"]["stages"]))

    def close(self) -> None:
        self.bar.close()
