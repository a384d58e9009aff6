"""Per-task metrics with 95% confidence intervals, synchronised across devices by torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["TaskMeanCI", "task_accuracy"]


def task_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Accuracy of each task: ``logits [tasks, queries, classes]``, ``targets [tasks, queries]`` -> ``[tasks]``."""
    return (logits.argmax(dim=-1) == targets).float().mean(dim=-1)


class TaskMeanCI(Metric):
    """Mean of a per-task value over tasks, with its 95% confidence interval.

    The interval is the few-shot literature's ``1.96 * std / sqrt(n)`` over tasks (sample standard
    deviation). States are sums in float64, reduced by summation, so the result over several
    devices equals the result on one device over the same tasks.

    Example:
        >>> metric = TaskMeanCI()
        >>> metric.update(torch.tensor([0.5, 1.0, 0.75]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'mean': 0.75, 'ci95': 0.2829, 'std': 0.25, 'n': 3.0}
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, keep_values: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep_values = keep_values
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        if keep_values:  # every task's value, gathered from all devices (in rank order)
            self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        self.total += values.sum()
        self.total_sq += (values * values).sum()
        self.count += values.numel()
        if self.keep_values:
            self.values.append(values)

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.total / n.clamp(min=1)
        var = ((self.total_sq - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
        std = var.sqrt()
        ci95 = 1.96 * std / n.clamp(min=1).sqrt()
        result = {"mean": mean, "ci95": ci95, "std": std, "n": n}
        if self.keep_values:
            result["values"] = dim_zero_cat(self.values) if len(self.values) else torch.zeros(0, dtype=torch.float64)
        return result

    @staticmethod
    def format(result: dict[str, Tensor], percent: bool = False) -> str:
        """``"0.9123 ± 0.0110 (n=600)"``; with ``percent``, ``"91.23% ± 1.10%"``."""
        mean, ci, n = float(result["mean"]), float(result["ci95"]), int(result["n"])
        if percent:
            return f"{100 * mean:.2f}% ± {100 * ci:.2f}% (n={n})"
        return f"{mean:.4f} ± {ci:.4f} (n={n})"

