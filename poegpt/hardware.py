"""What this machine computes fast, and the dtype and thread count that follow from it.

The same machine kind has been two CPUs: an AMD Zen 4-class host with AVX512_BF16, where bf16 GEMMs run
~2.9x fp32, and an AMD EPYC Zen 3 host with AVX2 only, where a bf16 1024² matmul ran 0.8 GFLOP/s per
thread against 67.6 in fp32 (~85x slower: no native bf16, every product is converted). So `--dtype auto`
picks bf16 only where the hardware has it (CUDA with bf16 support, or a CPU with AVX512_BF16 or AMX)
and fp32 elsewhere; an explicit bf16/fp16 on a CPU without native support runs, with one warning line.

    python -m poegpt.cli env        # what was detected and what auto picks
"""

from __future__ import annotations

import functools
import os
import platform
import sys

import torch

from .errors import PoEError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
NATIVE = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_warned: set[str] = set()


def parse_cpuinfo(text: str) -> dict:
    """{"model": name, "flags": the FLAGS present} from /proc/cpuinfo text (first processor's lines)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:   # x86 "flags", arm "Features"
            flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine(), "flags": [f for f in FLAGS if f in flags]}


@functools.cache
def cpu() -> dict:
    """This CPU: model name, the flags that matter, torch's CPU capability, usable cores."""
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:                                           # not Linux: no flags known, capability still is
        info = {"model": platform.processor() or platform.machine(), "flags": []}
    info["capability"] = torch.backends.cpu.get_cpu_capability()
    info["cores"] = usable_cores()
    return info


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def native_on_cpu(dtype: str, info: dict | None = None) -> bool:
    """Whether this CPU has native `dtype` ("bf16"/"fp16") matmuls; fp32 and fp64 always."""
    flags = (info or cpu())["flags"]
    return dtype not in NATIVE or any(f in flags for f in NATIVE[dtype])


def cuda_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype_name(name: str, device="cpu", info: dict | None = None, warn: bool = True) -> str:
    """"auto" -> "bf16" where it is native (CUDA with bf16, a CPU with AVX512_BF16 or AMX), else "fp32";
    an explicit name is kept, with one warning line when it is bf16/fp16 on a CPU without native support."""
    if name not in DTYPES and name != "auto":
        raise PoEError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_bf16(device) else "fp32"
        return "bf16" if device.type == "cpu" and native_on_cpu("bf16", info) else "fp32"
    if warn and device.type == "cpu" and not native_on_cpu(name, info):
        _warn_slow(name, info or cpu())
    return name


def resolve_dtype(name, device="cpu", info: dict | None = None, warn: bool = True) -> torch.dtype:
    """The torch dtype for a name ("auto", "fp32", "bf16", "fp16", "fp64") or a torch dtype, on `device`."""
    if isinstance(name, torch.dtype):
        name = {v: k for k, v in DTYPES.items()}.get(name, name)
        if isinstance(name, torch.dtype):
            return name
    return DTYPES[resolve_dtype_name(name, device, info, warn)]


def _warn_slow(name: str, info: dict) -> None:
    if name in _warned:
        return
    _warned.add(name)
    needs = " or ".join(f.upper() for f in NATIVE[name])
    print(f"poegpt: warning: {name} on this CPU ({info['model']}, torch capability {info['capability']}) has no "
          f"native {name} ({needs}), so its matmuls run much slower than fp32 (tens of times on AVX2 hosts); "
          f"use --dtype auto or fp32", file=sys.stderr)


def default_threads(cores: int | None = None) -> int:
    """Intra-op threads that do not oversubscribe: the usable cores shared by the local ranks (torchrun's
    LOCAL_WORLD_SIZE), and OMP_NUM_THREADS when the user set it."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, (cores or usable_cores()) // max(ranks, 1))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (the --threads override) or `default_threads()`."""
    if threads is not None and threads < 1:
        raise PoEError(f"--threads must be >= 1, got {threads}")
    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def describe() -> dict:
    """Everything `poegpt env` prints: the CPU, threads, CUDA devices, and what `auto` picks."""
    info = cpu()
    out = {"cpu": info["model"], "flags": info["flags"], "capability": info["capability"], "cores": info["cores"],
           "threads": torch.get_num_threads(), "default_threads": default_threads(),
           "native_bf16_cpu": native_on_cpu("bf16", info), "torch": torch.__version__,
           "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
           if torch.cuda.is_available() else []}
    out["auto_dtype"] = {"cpu": resolve_dtype_name("auto", "cpu", info)}
    if out["cuda"]:
        out["auto_dtype"]["cuda"] = resolve_dtype_name("auto", "cuda")
    return out
