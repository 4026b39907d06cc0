"""Keep only the active expert on the accelerator, and fetch the next one while it runs.

An ensemble of N experts costs N models of memory but one model of compute per step: the sampler
walks σ downwards, so the experts are needed one after another, each for a contiguous stretch of
steps. `Offloader` keeps every expert's weights in host memory (pinned on CUDA, so copies can
overlap compute) and gives each parameter and buffer a device copy only while its expert is the
active one or the next one: when expert k starts, expert k+1's copy is started on a side stream,
and anything else resident is dropped. Peak accelerator memory is therefore two experts, not N.

Weights are swapped by pointing each tensor's `.data` at the host or device copy: the host copy
never changes (sampling does not train), so dropping a device copy costs nothing and moving back
is one host→device copy. On a CPU-only run the "device" copies are clones in host memory: the
logic is the same (and tested), but nothing is saved there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Offloader:
    """Residency of an ensemble's experts on `device`; `activate(i)` before expert i runs."""

    def __init__(self, experts: Sequence[nn.Module], device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.experts = list(experts)
        self.host: list[list[tuple[Tensor, Tensor]]] = []  # per expert: (tensor, host copy)
        for e in self.experts:
            e.to("cpu")
            pairs = []
            for t in [*e.parameters(), *e.buffers()]:
                h = t.data.pin_memory() if self.cuda else t.data
                t.data = h
                pairs.append((t, h))
            self.host.append(pairs)
        self.resident: dict[int, list[Tensor]] = {}  # expert -> device copies, in host order
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.order: list[int] = []  # the order the sampler will need them (plan)
        self.peak_resident = 0
        self.transfers = 0

    def plan(self, owners: Sequence[int]) -> None:
        """The experts in the order the coming σ schedule asks for them (repeats dropped)."""
        self.order = [o for k, o in enumerate(owners) if k == 0 or owners[k - 1] != o]
        if self.order:
            self._fetch(self.order[0])

    def _fetch(self, i: int) -> None:
        if i in self.resident:
            return
        self.transfers += 1
        if self.stream is None:
            self.resident[i] = [h.clone() for _, h in self.host[i]]
            self.ready[i] = None
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.resident[i] = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[i] = event

    def _drop(self, i: int) -> None:
        copies = self.resident.pop(i)
        self.ready.pop(i, None)
        for t, h in self.host[i]:
            t.data = h
        if self.cuda:  # the copies may still be read by queued kernels: let the allocator know
            for c in copies:
                c.record_stream(torch.cuda.current_stream(self.device))

    def activate(self, i: int) -> None:
        """Make expert i's weights the device copies, prefetch the planned next expert, and
        drop every other device copy."""
        self._fetch(i)
        event = self.ready.get(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for (t, _), c in zip(self.host[i], self.resident[i]):
            t.data = c
        nxt = None
        if i in self.order:
            k = self.order.index(i)
            nxt = self.order[k + 1] if k + 1 < len(self.order) else None
        for j in [j for j in self.resident if j not in (i, nxt)]:
            self._drop(j)
        if nxt is not None:
            self._fetch(nxt)
        self.peak_resident = max(self.peak_resident, len(self.resident))

    def release(self) -> None:
        """Every expert back in host memory only (after sampling)."""
        for j in list(self.resident):
            self._drop(j)
