"""Environment glue for CPU machines that pair CPU torch with a CUDA torchvision wheel.

That torchvision cannot load its C ops, and its import then fails on
``register_fake("torchvision::nms")``. This import hook declares the two missing op schemas right
before torchvision is first imported. tools/install.sh installs it (via a .pth file) only where
``import torchvision`` fails; it is never part of the ediff_train package.
"""

from __future__ import annotations

import importlib.abc
import sys

_KEEP: list = []


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        return None  # let the normal finders load torchvision


def install() -> None:
    if not any(isinstance(f, _DeclareTorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclareTorchvisionOps())
