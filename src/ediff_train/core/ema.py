"""fp32 weights of the trained denoiser and their EMA, whatever the strategy partitions.

Under ZeRO the trained parameters are not what they seem: with bf16 they hold rounded copies of
the fp32 master weights the optimiser owns, and under stage 3 each rank holds only a slice of
each parameter (the tensor itself is empty between forwards). An EMA kept as a submodule of the
trained model would be cast to bf16 (where a 1e-4 update rounds to nothing), partitioned or even
broadcast by the engine, and an EMA read from `p.data` would average empty tensors: silently
wrong. So the EMA lives outside the model and reads, for each parameter, the fp32 *fragment this
rank owns* of the master copy: the whole tensor without ZeRO, a ZeRO-3 partition, or a ZeRO-1/2
fragment. Updates need no communication; the full weights are assembled only when saved, by
summing the disjoint fragments of all ranks (the same layout for the raw weights and the EMA).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Fragment:
    """The part [start, start + numel) of a flattened parameter this rank owns, in fp32."""

    start: int
    numel: int
    read: Callable[[], Tensor] | None  # returns the fp32 values of that part (1-D)
    sharded: bool  # the other parts live on other ranks


def fragment(p: nn.Parameter) -> Fragment:
    """Where this rank's fp32 copy of `p` lives (DeepSpeed's public accessors where it has them)."""
    if hasattr(p, "ds_id"):  # ZeRO-3: a contiguous partition of the flattened, padded parameter
        from deepspeed.utils import safe_get_local_fp32_param

        part = int(p.ds_tensor.ds_numel)
        start = min(dist.get_rank(group=p.ds_process_group) * part, int(p.ds_numel))
        numel = max(0, min(part, int(p.ds_numel) - start))
        return Fragment(start, numel, lambda: safe_get_local_fp32_param(p)[:numel], True)
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimiser: fp32 fragments
        mapping = p._hp_mapping
        if mapping is None:
            return Fragment(0, 0, None, True)
        addr = mapping.lp_fragment_address
        # re-read the mapping each time: DeepSpeed relinks it when it loads a checkpoint
        return Fragment(addr.start, addr.numel, lambda: p._hp_mapping.get_hp_fragment(), True)
    return Fragment(0, p.numel(), lambda: p.detach().reshape(-1), False)


@torch.no_grad()
def restore_fp32(model: nn.Module, full: dict[str, Tensor]) -> None:
    """Write full fp32 values into this rank's fragment of each parameter's fp32 master copy."""
    for name, p in model.named_parameters():
        frag = fragment(p)
        if frag.read is None or not frag.numel:
            continue
        target = frag.read()
        values = full[name].reshape(-1)[frag.start : frag.start + frag.numel]
        if not frag.sharded:
            p.copy_(values.reshape(p.shape).to(p.dtype))
        elif hasattr(p, "ds_id"):
            from deepspeed.utils import safe_set_local_fp32_param

            padded = torch.zeros(int(p.ds_tensor.ds_numel), dtype=torch.float32)
            padded[: frag.numel] = values
            safe_set_local_fp32_param(p, padded.to(target.device))
        else:
            target.copy_(values.to(target.device, target.dtype))  # a view into the partition


def _assemble(shape: torch.Size, frag: Fragment, values: Tensor | None) -> Tensor:
    """Full fp32 tensor on every rank from each rank's fragment (a collective when sharded)."""
    if not frag.sharded:
        assert values is not None
        return values.detach().float().reshape(shape).clone()
    device = values.device if values is not None else _comm_device()
    full = torch.zeros(shape.numel(), dtype=torch.float32, device=device)
    if frag.numel:
        full[frag.start : frag.start + frag.numel] = values
    dist.all_reduce(full)  # fragments are disjoint: the sum is the tensor
    return full.reshape(shape)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def full_fp32_state(model: nn.Module, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """The model's full fp32 state dict on every rank (call on all ranks: it may communicate)."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        frag = fragment(p)
        values = frag.read() if frag.read is not None and frag.numel else None
        out[name] = _assemble(shapes[name], frag, values).cpu()
    for name, b in model.named_buffers():
        out[name] = b.detach().float().cpu().clone() if b.is_floating_point() else b.cpu().clone()
    return out


class EMA:
    """Exponential moving average of a model's parameters, in fp32, outside that model.

    Before `attach` (and after `release`) it is a plain full copy, `self.module`. While attached
    to a model under ZeRO it holds only the fragments this rank owns; `state_dict` then assembles
    the full weights collectively and `load_state_dict` slices them back.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model).float().requires_grad_(False).eval()
        self.shapes = {n: p.shape for n, p in self.module.named_parameters()}
        self._slots: list[tuple[str, Fragment, Tensor]] | None = None
        self._model: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        # any slot, not the first: with LoRA under ZeRO the frozen base is whole on every rank
        # (no fp32 master) and only the adapter is fragmented
        return any(frag.sharded for _, frag, _ in self._slots or ())

    def attach(self, model: nn.Module) -> None:
        """Follow `model` (already set up by the strategy): keep only this rank's fragments."""
        params = dict(self.module.named_parameters())
        if [n for n, _ in model.named_parameters()] != list(params):
            raise RuntimeError("EMA and model parameters differ")
        slots = []
        for name, p in model.named_parameters():
            frag = fragment(p)
            mine = params[name]
            if frag.sharded:
                device = frag.read().device if frag.read and frag.numel else mine.device
                shadow = mine.detach().reshape(-1)[frag.start : frag.start + frag.numel]
                shadow = shadow.to(device, torch.float32).clone()
                mine.data = torch.empty(0)  # the full copy is rebuilt only when saved
            else:
                mine.data = mine.data.to(p.device)
                shadow = mine.data.view(-1)
            slots.append((name, frag, shadow))
        self._slots, self._model = slots, model
        self.module.to(next(model.parameters()).device if not self.sharded else "cpu")
        for name, b in self.module.named_buffers():
            b.data = b.data.to(dict(model.named_buffers())[name].device)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """ema ← decay·ema + (1 − decay)·weights, fragment by fragment (no communication)."""
        assert self._slots is not None and self._model is not None, "attach the EMA first"
        live = [
            (frag, shadow)
            for _, frag, shadow in self._slots
            if frag.numel and frag.read is not None
        ]
        if live:  # one foreach launch, not one per tensor (on a GPU the launches add up)
            shadows = [shadow for _, shadow in live]
            values = [frag.read().to(shadow.device, shadow.dtype) for frag, shadow in live]
            torch._foreach_lerp_(shadows, values, 1.0 - decay)
        mine = dict(self.module.named_buffers())
        for name, b in self._model.named_buffers():
            mine[name].copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """Full fp32 EMA weights on CPU (a collective when sharded: call on every rank)."""
        if not self.sharded:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        assert self._slots is not None
        out = {name: _assemble(self.shapes[name], f, s).cpu() for name, f, s in self._slots}
        out.update({k: b.detach().cpu().clone() for k, b in self.module.named_buffers()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Full weights in; only this rank's fragments kept when sharded."""
        if not self.sharded:
            self.module.load_state_dict(state, strict=True)
            return
        assert self._slots is not None
        for name, frag, shadow in self._slots:
            flat = state[name].reshape(-1)[frag.start : frag.start + frag.numel]
            shadow.copy_(flat.to(shadow.device, shadow.dtype))
        for name, b in self.module.named_buffers():
            b.copy_(state[name])

    def release(self) -> nn.Module:
        """Back to a full copy (collective when sharded); the module that sampling uses."""
        if self.sharded:
            full = self.state_dict()
            for name, p in self.module.named_parameters():
                p.data = full[name].to(p.device)
        self._slots, self._model = None, None
        return self.module
