"""Which device a job computes on, and the precision that follows from it.

``resolve("auto")`` picks CUDA, then Apple's MPS, then the CPU, and logs the choice; an explicit ``cpu``,
``cuda``, ``cuda:N`` or ``mps`` that this machine does not have is one clear error before any work starts.
``resolve_precision`` turns ``auto`` into bf16 on GPUs that support it (fp16, with a gradient scaler, on older
ones) and on CPUs with native bf16 dot products, fp32 elsewhere. ``autocast`` is the matching context.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from aigc.errors import UserError

log = logging.getLogger(__name__)

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve(name: str = "auto", what: str = "--device") -> torch.device:
    """The torch device for ``name`` (see the module's docstring)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        log.info("device: %s (auto)", device)
        return device
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"{what} {name}: no CUDA device here (this torch build or machine has none); use --device cpu or auto")
        index = 0
        if ":" in name:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise UserError(f"{what} {name}: expected {CHOICES}") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise UserError(f"{what} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if not _mps_available():
            raise UserError(f"{what} mps: Apple's Metal backend is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise UserError(f"{what} {name!r}: expected {CHOICES}")


def as_device(device: "str | torch.device") -> torch.device:
    """A torch device as given, or the one a name (``auto``, ``cpu``, ``cuda:1``, ...) resolves to: what the pipelines'
    loaders take."""
    return device if isinstance(device, torch.device) else resolve(device)


def check(name: str, what: str = "device") -> None:
    """Validate a configured device name where it is set, before any work starts."""
    if (name or "auto").strip().lower() != "auto":
        resolve(name, what)


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 dot products (AVX-512 BF16 or AMX), so autocast pays off."""
    from pathlib import Path

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for a loop's ``precision`` setting on ``device``."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("precision fp16 needs a GPU; on the CPU use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of a forward pass at ``precision`` (a no-op at fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device``: pinned and copied asynchronously when it is a GPU."""
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
