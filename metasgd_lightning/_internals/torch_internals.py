"""torch's private names that metasgd_lightning relies on, each behind one function (see the package docstring)."""

from __future__ import annotations

import torch

__all__ = ["functorch_transform_active", "torch_dispatch_mode"]


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running; ``True`` if torch cannot say.

    torch has no public way to ask this: ``torch._C._are_functorch_transforms_active`` answers it.
    Without it, :class:`~metasgd_lightning.methods.models.TaskBatchNorm2d` takes its plain-ops path
    everywhere: still correct, a little slower.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


def torch_dispatch_mode() -> type:
    """torch's base class of a mode that sees every aten op (``TorchDispatchMode``), for counting FLOPs.

    torch exports it only from the private ``torch.utils._python_dispatch``; ``torch.utils.flop_counter``'s
    public ``FlopCounterMode`` tracks modules with hooks that refuse ``torch.autograd.grad``, so it cannot
    follow an inner loop (``benchmarks/throughput.py``).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode
