"""Device and dtype choice: CUDA with bf16 when present, else CPU with fp32."""

from __future__ import annotations

import torch

from tokensel.errors import TokenselError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`; anything this machine cannot run is a TokenselError naming --device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise TokenselError(f"--device {name}: unknown device; choose auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise TokenselError(f"--device {name}: tokensel runs on cpu or cuda; choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TokenselError(f"--device {name}: this torch has no usable CUDA GPU (torch.cuda.is_available() is False); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TokenselError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return dev


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """`auto` is bf16 on a CUDA GPU that supports it, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise TokenselError(f"--dtype {name}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]
