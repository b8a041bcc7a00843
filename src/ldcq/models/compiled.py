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
            if first:
                self._compiled = torch.compile(self.fn, dynamic=False)
            start = time.perf_counter()
            out = self._compiled(*args, **kwargs)
            if first:
                self.compile_s = time.perf_counter() - start
            return out
        except Exception as exc:  # any backend failure means: run eagerly
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(
                f"{self.option}: torch.compile failed ({self.failed[:300]}); running eagerly. "
                f"Set {self.option}=false to skip the attempt",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # A compiled function does not pickle or copy: a copy compiles again when called.
        return {**self.__dict__, "_compiled": None, "compile_s": None}
