"""Mixed precision, one place for training and inference: which dtypes, where they make
sense, and the autocast context around the network (weights, loss and STFTs stay fp32)."""
import logging

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16():
    """Whether oneDNN reports bfloat16 units (AVX512-BF16 or AMX) on this CPU. Without them
    bf16 kernels are emulated: measured 1.5-2x slower than fp32 on small convolutions and
    hundreds of times slower on the default model's dilated ones (AMD EPYC, AVX2 only)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


def check_precision(precision, device, setting):
    """Refuse what cannot run, warn about what runs slowly; ``setting`` names where the
    choice came from in messages (``train.precision``, ``--precision``)."""
    if precision not in PRECISION_DTYPES:
        raise UserError(f"unknown {setting} {precision!r} (use {', '.join(PRECISION_DTYPES)})")
    if precision == "fp16" and device.type == "cpu":
        raise UserError(f"{setting} fp16 needs a CUDA (or MPS) device; on CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU has no bfloat16 support: use {setting} fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("this CPU has no native bfloat16 (AVX512-BF16 or AMX): bf16 runs emulated, far slower than "
                       "fp32 (use %s fp32 here)", setting)


def autocast(device, precision):
    """The network's autocast context (disabled for fp32)."""
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
