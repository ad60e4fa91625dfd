"""Mixed precision, one place for training and inference: which dtypes, where they make
sense, and the autocast context around the network (weights, loss and STFTs stay fp32).

bfloat16 on a CPU depends on its instruction sets, in three grades (:func:`cpu_bf16_support`):

* ``native``: bfloat16 arithmetic units (AVX512-BF16, AMX-BF16; ARM's BF16): bf16 is the fast path;
* ``converted``: oneDNN runs bf16 convolutions by converting to fp32 (AVX-512 BW/VL/DQ without
  BF16 units, or AVX-NE-CONVERT): it works, slower than fp32;
* ``none``: oneDNN refuses bf16 convolutions (AVX2 only: "bf16 path needs the cpu support
  avx_ne_convert or avx512bw, avx512vl and avx512dq"), and PyTorch's own fallback is emulated,
  hundreds of times slower than fp32 (about 100 s against 0.5 s for one dilated layer of the
  default model on an AVX2 AMD EPYC).

On ``none``, bf16 asked for (``--precision bf16``, ``train.precision: bf16``) falls back to fp32
with one warning line: the results are the same to float rounding, and a config or a script
written on another machine still runs here. ``VOICEFILTER_CPU_BF16=native|converted|none``
overrides what is read off the CPU (to compare the paths, or to keep bf16 off).
"""
import functools
import logging
import os
import platform
from pathlib import Path

import torch

from reverse_voicefilter.core.errors import UserError

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_NATIVE, BF16_CONVERTED, BF16_NONE = "native", "converted", "none"
BF16_GRADES = (BF16_NATIVE, BF16_CONVERTED, BF16_NONE)
BF16_ENV = "VOICEFILTER_CPU_BF16"

_X86_UNITS = ("avx512_bf16", "amx_bf16")                # bf16 dot products in hardware
_X86_ONEDNN_CORE = ("avx512bw", "avx512vl", "avx512dq")  # what oneDNN's bf16 kernels need, or:
_X86_NE_CONVERT = "avx_ne_convert"


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The instruction-set flags of the first CPU (x86 ``flags``, ARM ``Features``), or ``None``
    where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def bf16_grade(flags, machine, onednn_bf16):
    """The bf16 grade of a CPU with instruction-set ``flags`` (``None``: unknown) and architecture
    ``machine`` (``platform.machine()``), where oneDNN reports ``onednn_bf16`` for its bf16 check."""
    if not onednn_bf16:
        return BF16_NONE
    if flags is None:
        return BF16_NATIVE  # nothing to go by but oneDNN's word
    if machine.lower() in ("x86_64", "amd64", "i686", "x86"):
        if any(f in flags for f in _X86_UNITS):
            return BF16_NATIVE
        if all(f in flags for f in _X86_ONEDNN_CORE) or _X86_NE_CONVERT in flags:
            return BF16_CONVERTED
        return BF16_NONE
    return BF16_NATIVE if "bf16" in flags else BF16_CONVERTED


@functools.cache
def _detected_grade():
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    onednn = bool(check()) if check is not None else True
    return bf16_grade(cpu_flags(), platform.machine(), onednn and torch.backends.mkldnn.is_available())


def cpu_bf16_support():
    """``native``, ``converted`` or ``none`` for this CPU (see the module's docstring); the
    ``VOICEFILTER_CPU_BF16`` environment variable, where set, decides instead."""
    forced = os.environ.get(BF16_ENV, "").strip().lower()
    if forced:
        if forced not in BF16_GRADES:
            raise UserError(f"{BF16_ENV} is {forced!r}: use one of {', '.join(BF16_GRADES)}")
        return forced
    return _detected_grade()


def cpu_has_native_bf16():
    """Whether bf16 is this CPU's fast path (bfloat16 units)."""
    return cpu_bf16_support() == BF16_NATIVE


def cpu_runs_bf16():
    """Whether oneDNN runs bf16 convolutions on this CPU (natively or by conversion)."""
    return cpu_bf16_support() != BF16_NONE


def check_precision(precision, device, setting):
    """The precision that will run: ``precision`` itself, or fp32 where a CPU cannot run bf16.
    Refuses what cannot run at all, warns about what runs slowly; ``setting`` names where the
    choice came from in messages (``train.precision``, ``--precision``)."""
    if precision not in PRECISION_DTYPES:
        raise UserError(f"unknown {setting} {precision!r} (use {', '.join(PRECISION_DTYPES)})")
    if precision == "fp16" and device.type == "cpu":
        raise UserError(f"{setting} fp16 needs a CUDA (or MPS) device; on CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU has no bfloat16 support: use {setting} fp32")
    if precision == "bf16" and device.type == "cpu":
        grade = cpu_bf16_support()
        if grade == BF16_NONE:
            logger.warning("%s bf16: this CPU cannot run bfloat16 convolutions (they need AVX-512 BW/VL/DQ or "
                           "AVX-NE-CONVERT), so fp32 runs instead: the same results to float rounding", setting)
            return "fp32"
        if grade == BF16_CONVERTED:
            logger.warning("%s bf16: this CPU has no bfloat16 units (AVX512-BF16 or AMX): bf16 runs by conversion, "
                           "slower than fp32 (use %s fp32 here)", setting, setting)
    return precision


def autocast(device, precision):
    """The network's autocast context (disabled for fp32)."""
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
