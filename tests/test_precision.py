"""bf16 on CPUs: the grade read off the CPU, the fp32 fallback where oneDNN cannot run bf16, and the
fused convolution only where it runs. Each branch is forced here, so every CPU tests all of them."""
import logging

import pytest
import torch
import torch.nn.functional as F

import reverse_voicefilter.model.model as model_module
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.precision import (
    BF16_ENV,
    bf16_grade,
    check_precision,
    cpu_bf16_support,
    cpu_flags,
    cpu_runs_bf16,
)
from reverse_voicefilter.model.model import ConvReLU

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
SKYLAKE_X = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


@pytest.mark.parametrize("flags, machine, onednn, grade", [
    (AVX2, "x86_64", False, "none"),                              # AMD EPYC (Zen 2/3): the failing case
    (AVX2, "x86_64", True, "none"),                               # even if oneDNN's check said otherwise
    (SKYLAKE_X, "x86_64", True, "converted"),                     # AVX-512 without BF16 units
    (SKYLAKE_X | {"avx512_bf16"}, "x86_64", True, "native"),      # Cooper Lake, AMD Zen 4
    (SKYLAKE_X | {"amx_bf16", "amx_tile"}, "x86_64", True, "native"),  # Sapphire Rapids
    (AVX2 | {"avx_ne_convert", "avx_vnni"}, "x86_64", True, "converted"),  # client CPUs with AVX-NE-CONVERT
    (SKYLAKE_X | {"avx512_bf16"}, "x86_64", False, "none"),       # oneDNN built without bf16
    (None, "x86_64", True, "native"),                             # flags unknown: oneDNN's word
    ({"fp", "asimd", "bf16"}, "aarch64", True, "native"),
    ({"fp", "asimd"}, "aarch64", True, "converted"),
])
def test_bf16_grade_of_known_cpus(flags, machine, onednn, grade):
    assert bf16_grade(None if flags is None else frozenset(flags), machine, onednn) == grade


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512bw\n\nflags : x\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512bw"}
    assert cpu_flags(tmp_path / "absent") is None


def test_the_environment_forces_the_grade(monkeypatch):
    for grade in ("native", "converted", "none"):
        monkeypatch.setenv(BF16_ENV, grade)
        assert cpu_bf16_support() == grade
    monkeypatch.setenv(BF16_ENV, "fast")
    with pytest.raises(UserError, match="VOICEFILTER_CPU_BF16 is 'fast'"):
        cpu_bf16_support()


@pytest.mark.parametrize("grade, runs, warned", [("native", "bf16", None), ("converted", "bf16", "by conversion"),
                                                 ("none", "fp32", "fp32 runs instead")])
def test_bf16_on_a_cpu_by_grade(monkeypatch, caplog, grade, runs, warned):
    monkeypatch.setenv(BF16_ENV, grade)
    with caplog.at_level(logging.WARNING):
        assert check_precision("bf16", torch.device("cpu"), "--precision") == runs
    lines = [r.getMessage() for r in caplog.records]
    assert (lines == []) if warned is None else (len(lines) == 1 and warned in lines[0] and "--precision bf16" in
                                                 lines[0])
    caplog.clear()
    assert check_precision("fp32", torch.device("cpu"), "--precision") == "fp32" and not caplog.records


def _conv():
    torch.manual_seed(0)
    return torch.nn.Conv2d(8, 8, (5, 5), dilation=(2, 1), padding=(4, 2)).eval()


@pytest.mark.parametrize("grade, fused_in_bf16", [("native", True), ("converted", True), ("none", False)])
def test_the_fused_convolution_runs_in_bf16_only_where_onednn_runs_it(monkeypatch, grade, fused_in_bf16):
    monkeypatch.setenv(BF16_ENV, grade)
    calls = []

    def recorded(x, conv, dtype):  # stands in for the oneDNN call, which would fail on an AVX2 CPU
        calls.append(dtype)
        return F.relu(conv(x.to(dtype)))

    monkeypatch.setattr(model_module, "_fused_conv_relu", recorded)
    conv = _conv()
    x = torch.randn(1, 8, 12, 33)
    with torch.inference_mode():
        ConvReLU(conv)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ConvReLU(conv)(x)
    assert out.dtype == torch.bfloat16
    assert calls == ([torch.float32, torch.bfloat16] if fused_in_bf16 else [torch.float32])


@pytest.mark.skipif(not cpu_runs_bf16(), reason="this CPU cannot run oneDNN's bf16 convolutions")
def test_the_real_fused_bf16_convolution_where_the_cpu_runs_it():
    conv = _conv()
    x = torch.randn(2, 8, 30, 65)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = torch.relu(conv(x)), ConvReLU(conv)(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
