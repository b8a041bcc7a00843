"""A function run through ``torch.compile`` when asked, falling back to eager when it cannot be.

Compilation happens at the first call (and again when shapes or dtypes change); on CPU Inductor
needs a C++ compiler, and some backends or platforms have none. A failure there is not the user's
error: the function runs eagerly from then on, after one warning naming the option to turn off.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.exc
import torch._inductor.exc

# What a backend that cannot compile raises, at the first call or at a recompile: Dynamo's errors
# (Inductor's usually arrive wrapped in BackendCompilerFailed) and Inductor's own.
COMPILE_ERRORS: tuple[type[Exception], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    torch._inductor.exc.InductorError,
    torch._inductor.exc.CppCompileError,
)


class CompiledOrEager:
    """Calls ``owner.<name>`` compiled when ``enabled``, else (or once compiling failed) eagerly.

    Args:
        owner, name: the object and the name of the eager method (looked up at each call).
        option: the config key that enables it, named in the fallback warning.
    """

    def __init__(self, owner: Any, name: str, option: str) -> None:
        self.owner, self.name, self.option = owner, name, option
        self.enabled = False
        self.failed: str | None = None
        self.compile_s: float | None = None  # wall seconds of the first (compiling) call
        self._compiled: Callable[..., Any] | None = None

    @property
    def fn(self) -> Callable[..., Any]:
        return getattr(self.owner, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self.failed is not None:
            return self.fn(*args, **kwargs)
        first = self._compiled is None
        try:
            if first:  # refuses platforms it does not support (RuntimeError) at once
                self._compiled = torch.compile(self.fn, dynamic=False)
            start = time.perf_counter()
            out = self._compiled(*args, **kwargs)
        except COMPILE_ERRORS as exc:
            return self._fall_back(exc, *args, **kwargs)
        except RuntimeError as exc:
            if not first:
                raise  # a compiled call that ran before: a real error, not the compiler's
            return self._fall_back(exc, *args, **kwargs)
        if first:
            self.compile_s = time.perf_counter() - start
        return out

    def _fall_back(self, exc: Exception, *args: Any, **kwargs: Any) -> Any:
        """Warn once and run eagerly from now on; the eager call raises a real error again."""
        self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            f"{self.option}: torch.compile failed ({self.failed[:300]}); running eagerly. "
            f"Set {self.option}=false to skip the attempt",
            RuntimeWarning,
            stacklevel=3,
        )
        return self.fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # A compiled function does not pickle or copy: a copy compiles again when called.
        return {**self.__dict__, "_compiled": None, "compile_s": None}


class CompiledForward:
    """``module`` as a sampler calls it: its forward through :class:`CompiledOrEager`, every other
    attribute (``embed_state``, ``output_proj``, …) the module's own.

    The samplers denoise the same shapes at every step, so one compilation serves a whole bank or
    evaluation; Inductor fuses the LayerNorm/GELU/FiLM chains that dominate small batches.
    """

    def __init__(self, module: torch.nn.Module, option: str) -> None:
        self.module = module
        self.forward = CompiledOrEager(module, "forward", option)
        self.forward.enabled = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("module", "forward"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)
