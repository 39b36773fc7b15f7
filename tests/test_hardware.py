"""dtype auto and threads from what the CPU has: both CPU kinds of this machine kind, by their cpuinfo text."""

import pytest
import torch

from poegpt import PoEError, hardware
from poegpt.cli import main

REAL_CPU = hardware.cpu   # conftest replaces hardware.cpu by a fixed no-bf16 CPU in every test

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 fma avx avx2 avx512f avx512dq avx512_bf16 avx512vl avx512_vnni
"""


def as_info(text):
    return {**hardware.parse_cpuinfo(text), "capability": "X", "cores": 2}


def test_parse_cpuinfo_reads_model_and_the_flags_that_matter():
    assert hardware.parse_cpuinfo(ZEN3) == {"model": "AMD EPYC 7B13", "flags": ["avx2", "fma"]}
    assert hardware.parse_cpuinfo(ZEN4) == {"model": "AMD EPYC 9B14", "flags": ["avx2", "fma", "avx512f", "avx512_bf16"]}


def test_auto_is_bf16_only_where_native():
    assert hardware.resolve_dtype_name("auto", "cpu", as_info(ZEN3)) == "fp32"
    assert hardware.resolve_dtype_name("auto", "cpu", as_info(ZEN4)) == "bf16"
    assert hardware.resolve_dtype("auto", "cpu", as_info(ZEN3)) is torch.float32
    assert hardware.resolve_dtype(torch.bfloat16, "cpu", as_info(ZEN4)) is torch.bfloat16
    with pytest.raises(PoEError, match="dtype must be auto"):
        hardware.resolve_dtype_name("float8", "cpu", as_info(ZEN3))


def test_explicit_bf16_or_fp16_without_native_support_warns_once(capsys, monkeypatch):
    monkeypatch.setattr(hardware, "_warned", set())
    assert hardware.resolve_dtype_name("bf16", "cpu", as_info(ZEN3)) == "bf16"
    assert hardware.resolve_dtype_name("bf16", "cpu", as_info(ZEN3)) == "bf16"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no native bf16" in lines[0] and "AMD EPYC 7B13" in lines[0]
    hardware.resolve_dtype_name("fp16", "cpu", as_info(ZEN4))          # Zen 4 has no AVX512_FP16 either
    assert "no native fp16" in capsys.readouterr().err
    hardware.resolve_dtype_name("bf16", "cpu", as_info(ZEN4))
    hardware.resolve_dtype_name("fp32", "cpu", as_info(ZEN3))
    assert capsys.readouterr().err == ""


def test_default_threads_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hardware.default_threads(cores=8) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert hardware.default_threads(cores=2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert hardware.default_threads(cores=8) == 3
    with pytest.raises(PoEError, match="--threads must be >= 1"):
        hardware.set_threads(0)


def test_auto_on_this_host_is_bf16_when_it_has_native_bf16():
    info = REAL_CPU()
    if not hardware.native_on_cpu("bf16", info):
        pytest.skip(f"this CPU ({info['model']}, {info['capability']}) has no native bf16 (AVX512_BF16 or AMX)")
    assert hardware.resolve_dtype_name("auto", "cpu", info) == "bf16"


def test_env_command_prints_what_was_detected(capsys):
    assert not main(["env"])
    out = capsys.readouterr().out
    assert "test CPU (AVX2)" in out and "auto_dtype" in out and '"cpu": "fp32"' in out


def test_generate_bf16_on_a_cpu_without_it_warns(capsys, monkeypatch):
    monkeypatch.setattr(hardware, "_warned", set())
    assert not main(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "bf16", "--threads", "1"])
    err = capsys.readouterr().err
    assert "warning: bf16 on this CPU" in err and "much slower than fp32" in err
