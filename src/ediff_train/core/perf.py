"""Speed pieces of the training step: host-to-GPU copies that do not wait, fused AdamW with the
gradient clipping Lightning refuses it, and `torch.compile` of the denoiser with a clean eager
fallback. None of them changes what a step computes; on CPU only compile does anything.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ediff_train.errors import EdiffError


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t`, made on the host, on `device` without making the host wait for the GPU.

    A plain `.to("cuda")` from pageable memory blocks until every queued kernel has run: a host
    sync in the middle of the step. From pinned memory a non-blocking copy is queued like a
    kernel; PyTorch's pinned-memory cache keeps the buffer until the copy has run."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def adamw(
    params: list[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    fusable: bool,
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel launch for all tensors) when `fusable` and every parameter is on
    a GPU; else PyTorch's default (foreach on CUDA, the plain loop on CPU: CPU runs unchanged).

    The caller says `fusable=False` under DeepSpeed (it partitions and wraps the optimiser
    itself) and under a GradScaler (a fused step unscales inside, so clipping would see scaled
    gradients)."""
    fused = fusable and bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True if fused else None
    )


def is_fused(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "defaults", {}).get("fused"))


def clip_gradients(params: Iterable[Tensor], value: float, algorithm: Any = "norm") -> None:
    """Clip like Lightning does, without its refusal of fused optimisers (it assumes a fused
    step means a GradScaler; with bf16 there is none and the gradients are unscaled).
    clip_grad_norm_ keeps the total norm on the device: no host sync."""
    grads = [p for p in params if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(grads, value)
    else:
        torch.nn.utils.clip_grad_norm_(grads, value)


@contextlib.contextmanager
def _eager_backward_lowering() -> Iterator[None]:
    """AOTAutograd compiles the backward graph lazily, inside loss.backward(), where a failure
    can no longer fall back. Forced eager, it is compiled during the forward call, which the
    fallback wraps. (A private switch: without it, backward failures stay possible.)"""
    try:
        import torch._functorch.config as aot_config
    except ImportError:
        yield
        return
    if not hasattr(aot_config, "force_non_lazy_backward_lowering"):
        yield
        return
    with aot_config.patch(force_non_lazy_backward_lowering=True):
        yield


def _first_line(e: BaseException) -> str:
    """`Type: first line` of the error that stopped compilation (inside dynamo's wrapper)."""
    while isinstance(getattr(e, "inner_exception", None), BaseException):
        e = e.inner_exception  # type: ignore[attr-defined]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class CompiledDenoiser:
    """`torch.compile(module)` that trains on eagerly, after one warning line, if compiling fails.

    A plain object, not a submodule: registered in the module tree, the compiled wrapper would
    add every parameter a second time under `_orig_mod.` names. The wrapped module keeps its own
    names, so checkpoints and weights.safetensors are those of an eager run. Compilation runs on
    the first call (and again for a new input shape); a missing C++ compiler or an op the backend
    cannot lower surfaces there, as an exception this wrapper turns into the eager call. Errors
    eager would raise as well (our own EdiffError, out-of-memory) propagate untouched."""

    def __init__(self, module: nn.Module, backend: str | Callable[..., Any] = "inductor") -> None:
        self.module = module
        self.backend = backend
        self.failure: str | None = None
        self._fn: Callable[..., Any] | None = None
        try:
            self._fn = torch.compile(module, backend=backend)
        except Exception as e:  # noqa: BLE001 - e.g. a backend name torch does not know
            self._fall_back(e)

    @property
    def compiled(self) -> bool:
        """Still running the compiled graph (False once it fell back to eager)."""
        return self._fn is not None

    def _fall_back(self, e: BaseException) -> None:
        self._fn = None
        self.failure = _first_line(e)
        print(
            f"warning: torch.compile (backend {self.backend!r}) failed, training the denoiser "
            f"eagerly instead ({self.failure})",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:
            return self.module(*args, **kwargs)
        try:
            with _eager_backward_lowering():
                return self._fn(*args, **kwargs)
        except (EdiffError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - any compile failure: the eager call decides
            self._fall_back(e)
            return self.module(*args, **kwargs)
