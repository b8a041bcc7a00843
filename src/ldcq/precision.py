"""Which numeric precision a stage runs in: ``trainer.precision: auto`` (the default) picks
``bf16-mixed`` where the hardware multiplies bf16 natively and ``32-true`` elsewhere.

Native means: a CUDA GPU whose bf16 is not emulated (Ampere and later), or a CPU with AMX-BF16 or
AVX512-BF16 (oneDNN's bf16 matmul then runs several times faster than fp32; without them bf16 is
emulated and slower than fp32). ``16-mixed`` needs a GPU. The concrete value, never ``auto``, is
what Lightning gets, what stage fingerprints hold and what ``spec.json`` records, with the reason.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ldcq.errors import ConfigError

AUTO = "auto"
# Lightning's precision names and the autocast dtype of each (None: no autocast).
DTYPES: dict[str, torch.dtype | None] = {
    "32-true": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}
# Lightning's other names: the short aliases it maps to ours, and precisions without autocast.
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
OTHER = ("64-true", "bf16-true", "16-true", "transformer-engine", "transformer-engine-float16")
VALID = (AUTO, *DTYPES, *OTHER)
# CPU capability flags (torch.cpu.get_capabilities()) that mean a native bf16 matmul.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def target_device(accelerator: str | None) -> str:
    """``cuda`` or ``cpu``: where a stage with this ``trainer.accelerator`` runs."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``device`` (cuda | cpu) multiplies bf16 natively, and what was found."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"the GPU ({name}) has bf16"
        return False, f"the GPU ({name}) has no native bf16"
    flags = _cpu_flags()
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {found[0].upper().replace('_', '-')}"
    return False, "the CPU has no native bf16 matmul (AMX-BF16 or AVX512-BF16)"


def _cpu_flags() -> set[str]:
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no capability query
        return set()
    return {str(k).lower() for k, v in dict(caps).items() if v is True}


def resolve(precision: Any, accelerator: str | None) -> tuple[str, str]:
    """The concrete precision for ``precision`` (``auto`` or a Lightning name) on
    ``accelerator``, and why it was chosen."""
    value = ALIASES.get(str(precision), str(precision))
    if value not in VALID:
        raise ConfigError(
            f"trainer.precision={value!r} is not a precision; valid values are {list(VALID)}"
        )
    device = target_device(accelerator)
    gpu_only = value in ("16-mixed", "16-true") or value.startswith("transformer-engine")
    if gpu_only and device != "cuda":
        raise ConfigError(
            f"trainer.precision={value} needs a CUDA GPU; on a CPU use bf16-mixed or auto"
        )
    if value != AUTO:
        return value, "set in the config"
    native, found = native_bf16(device)
    return ("bf16-mixed" if native else "32-true"), f"auto: {found}"


def on_cpu(precision: str, reason: str) -> tuple[str, str]:
    """A concrete precision chosen for another device (the GPU that sampled the bank) as this
    CPU runs it: bf16-mixed only where bf16 is native here, else 32-true."""
    if precision == "32-true" or (precision == "bf16-mixed" and native_bf16("cpu")[0]):
        return precision, reason
    why = native_bf16("cpu")[1] if precision == "bf16-mixed" else "it needs a GPU"
    return "32-true", f"{precision} inherited, but the policy runs on this CPU and {why}"


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a concrete ``precision`` on ``device`` (none for ``32-true`` and
    for Lightning's ``-true`` precisions, which cast the weights instead)."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def resolve_config(container: dict[str, Any]) -> dict[str, Any]:
    """A resolved config tree with the shared ``trainer.precision`` made concrete: ``auto`` on a
    host without native bf16 is the same run as ``32-true`` (the same config hash)."""
    trainer = container.get("trainer", {})
    concrete, _ = resolve(trainer.get("precision") or AUTO, trainer.get("accelerator"))
    return {**container, "trainer": {**trainer, "precision": concrete}}
