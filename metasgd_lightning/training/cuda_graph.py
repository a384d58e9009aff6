"""A whole Meta-SGD training step replayed as one CUDA graph.

On a GPU a step of small tasks is bound by kernel launches: the vectorised inner loop, the query loss,
the meta-backward (a double backward) and the optimiser step are thousands of small kernels, each
launched from Python. :class:`CudaGraphStep` records the step once, for one shape of meta-batch, and
then replays it with a single launch: the inputs are copied into the recorded tensors, the graph runs,
and θ, α and the optimiser's state are updated in place, as by the eager step.

It runs the first ``warmup_steps`` steps eagerly (real training steps, on a side stream as CUDA graphs
want), records the next one and replays it from then on. Where a step cannot be captured it runs
eagerly and says why in one line, once: not on CUDA, an optimiser that cannot run inside a graph, a
meta-batch whose shapes differ from the recorded one, or an error while recording.

Divergence is handled as in the eager step: the graph checks that every support and query loss is
finite, and saves θ, α and the optimiser's state before its update; after a replay whose losses were
not all finite, they are put back and :class:`~metasgd_lightning.InnerLoopDivergedError` is raised, so
the step leaves the weights as the eager step (which raises before updating) does.

For a LightningModule, ``optimizer=None`` leaves the optimiser's step to the caller (Lightning's wrapper,
which counts it): the graph then holds the inner loop and the meta-backward, and the call returns with
the gradients in ``.grad``, or raises on divergence before any update.

Only the GPU can check that replays equal eager steps: ``tests/test_cuda_graph.py`` (skipped without
CUDA) and ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..methods.contract import LossFn, TaskBatchResult, check_task_batch
from ..methods.metasgd import MetaSGD

__all__ = ["CudaGraphStep", "cuda_graph_unavailable_reason"]


def cuda_graph_unavailable_reason(device: torch.device, optimizer: torch.optim.Optimizer | None) -> str | None:
    """Why a training step on ``device`` cannot be captured (with ``optimizer``'s step, if given), or ``None``."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the step runs on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.is_autocast_enabled("cuda"):
        return "autocast (mixed precision) is on; the captured step is float32 only"
    for group in optimizer.param_groups if optimizer is not None else ():
        if "capturable" not in group:
            return (f"{type(optimizer).__name__} has no `capturable` option (Adam and AdamW have one; the graph needs "
                    "its step count and learning rate on the device)")
        if group.get("differentiable"):
            return f"{type(optimizer).__name__} with differentiable=True cannot be captured"
    return None


class CudaGraphStep:
    """One Meta-SGD training step (eager for ``warmup_steps`` steps, then a replayed CUDA graph).

    Each call adapts every task of the meta-batch (``adapt_tasks`` with ``vectorize="vmap"``: fixed
    shapes, no per-task Python branches) and backpropagates the mean query loss into the ``.grad`` of
    θ and α; with ``optimizer`` it then clips the gradient norm (``gradient_clip_val``) and takes the
    optimiser's step, inside the graph. ``optimizer`` must hold the parameters of ``meta`` that require
    grad; its groups are made ``capturable`` and their learning rates tensors (so that a scheduler's
    changes reach the graph) before the first step.

    Without ``optimizer`` (``None``) the caller takes the step after each call, eagerly, e.g. through
    Lightning's optimiser wrapper, which then counts the step: the graph holds the inner loop and the
    meta-backward (nearly all of the kernels), the gradients are in ``.grad`` when the call returns,
    and a diverged step raises before any update, as the eager step does.

    Args:
        meta: the meta-learner.
        optimizer: its optimiser, one with a ``capturable`` option (Adam, AdamW), or ``None`` (see above).
        loss_fn: ``loss_fn(outputs, targets)`` of the tasks.
        steps, first_order, step_weights: as in :meth:`MetaSGD.adapt_tasks`.
        gradient_clip_val: clip the meta-gradient's norm to this before the step (``None``: no clipping).
        warmup_steps: eager steps before the capture (cuDNN and the allocator settle; at least 1).
        enabled: ``False`` runs every step eagerly (the reference the tests compare with).
        log: where the one-line fallback messages go.

    Example (on a GPU)::

        step = CudaGraphStep(meta, optimizer, F.cross_entropy)
        for batch in loader:
            result = step(batch)           # a TaskBatchResult; result.query_loss.mean() is the meta-loss
    """

    def __init__(self, meta: MetaSGD, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
                 steps: int | None = None, first_order: bool | None = None, step_weights: Tensor | None = None,
                 gradient_clip_val: float | None = None, warmup_steps: int = 2, enabled: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.meta, self.optimizer, self.loss_fn = meta, optimizer, loss_fn
        self.steps, self.first_order, self.step_weights = steps, first_order, step_weights
        if gradient_clip_val is not None and optimizer is None:
            raise ValueError("`gradient_clip_val` clips before the optimiser's step: give the optimizer, or clip yourself.")
        self.gradient_clip_val = gradient_clip_val
        self.warmup_steps = max(1, int(warmup_steps))
        self.log = log
        self.device = next(meta.parameters()).device
        self.params = [p for p in meta.parameters() if p.requires_grad]
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: tuple[Tensor, ...] | None = None
        self._told: set[str] = set()
        self.fallback_reason = None if enabled else "capture disabled"
        if enabled:
            self.fallback_reason = cuda_graph_unavailable_reason(self.device, optimizer)
            if self.fallback_reason is not None:
                self._tell(self.fallback_reason)
            elif optimizer is not None:
                self._make_capturable()

    # -- the step --------------------------------------------------------------------------------------

    def __call__(self, batch: Sequence[Tensor]) -> TaskBatchResult:
        batch = check_task_batch(batch)
        self.calls += 1
        if self.fallback_reason is not None or self.calls <= self.warmup_steps:
            return self._eager(batch, side_stream=self.fallback_reason is None)
        if self.graph is None:
            self._capture(batch)
            if self.graph is None:
                return self._eager(batch)
        if [(t.shape, t.dtype) for t in batch] != [(t.shape, t.dtype) for t in self.static_batch]:
            self._tell(f"a meta-batch of shapes {[tuple(t.shape) for t in batch]} differs from the captured "
                       f"{[tuple(t.shape) for t in self.static_batch]}: such steps run eagerly")
            return self._eager(batch)
        return self._replay(batch)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _tell(self, reason: str) -> None:
        if reason not in self._told:
            self._told.add(reason)
            self.log(f"CUDA graph: the training step runs eagerly: {reason}.")

    def _adapt(self, batch) -> TaskBatchResult:
        return self.meta.adapt_tasks(*batch, self.loss_fn, steps=self.steps, vectorize="vmap", first_order=self.first_order,
                                     step_weights=self.step_weights)

    def _update(self) -> None:
        if self.optimizer is None:
            return
        if self.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip_val, foreach=self.device.type == "cuda")
        self.optimizer.step()

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _eager(self, batch, side_stream: bool = False) -> TaskBatchResult:
        stream = torch.cuda.Stream() if side_stream and self.device.type == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._zero_grad()
            result = self._adapt(batch)
            result.raise_if_not_finite("training")
            result.query_loss.mean().backward()
            self._update()
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        return result

    # -- capture and replay ----------------------------------------------------------------------------

    def _make_capturable(self) -> None:
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            if not isinstance(group["lr"], Tensor):  # a scheduler then fills this tensor, which the graph reads
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        for state in self.optimizer.state.values():  # e.g. loaded from a checkpoint: step counts on the host
            for key, value in state.items():
                if isinstance(value, Tensor) and value.device != self.device:
                    state[key] = value.to(self.device)

    def _state_tensors(self) -> list[Tensor]:
        """What the graph's optimiser step overwrites: θ, α and the optimiser's state (none without an optimiser)."""
        if self.optimizer is None:
            return []
        tensors = list(self.params)
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        return tensors

    def _capture(self, batch) -> None:
        self.static_batch = tuple(t.detach().clone() for t in batch)
        self.saved = self._state_tensors()
        self.backups = [t.detach().clone() for t in self.saved]
        graph = torch.cuda.CUDAGraph()
        self._zero_grad()  # the backward in the graph allocates the gradients from its pool, the replays reuse them
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                result = self._adapt(self.static_batch)
                self.static_finite = (torch.isfinite(result.support_loss).all()
                                      & torch.isfinite(result.query_loss.detach()).all())
                result.query_loss.mean().backward()
                with torch.no_grad():  # what the update overwrites, kept for a diverged step
                    for backup, tensor in zip(self.backups, self.saved):
                        backup.copy_(tensor)
                self._update()
        except Exception as error:  # noqa: BLE001 - any failure to record falls back to eager steps
            torch.cuda.synchronize(self.device)
            self._zero_grad()
            self.fallback_reason = f"capture failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
            self._tell(self.fallback_reason)
            self.graph = None
            return
        self.static_grads = [p.grad for p in self.params]
        self.static_result = result
        self.graph = graph

    def _replay(self, batch) -> TaskBatchResult:
        for static, new in zip(self.static_batch, batch):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        for p, grad in zip(self.params, self.static_grads):  # a caller's zero_grad(set_to_none) may have dropped them
            p.grad = grad
        result = TaskBatchResult(*(t.detach().clone() for t in (
            self.static_result.query_loss, self.static_result.query_output, self.static_result.support_loss,
            self.static_result.step_scale)))
        if not bool(self.static_finite):  # one host sync per step, as raise_if_not_finite in the eager step
            with torch.no_grad():
                for tensor, backup in zip(self.saved, self.backups):
                    tensor.copy_(backup)
            result.raise_if_not_finite("training")
        return result
