"""Figures of adaptation, drawn from a training module: the TensorBoard views and the plot commands use them.

- :func:`sine_figure`: sine tasks, their true curves and support points, θ before adaptation, after one
  inner step and after ``eval_inner_steps`` steps;
- :func:`task_figure`: one image task, its support images and the adapted model's prediction for each query.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pyplot", "sine_figure", "task_figure"]


def pyplot():
    """matplotlib's pyplot on the Agg back end (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sine_figure(module, task_set, indices, x_range: tuple[float, float], steps: int | None = None, title: str = ""):
    """The figure of ``metasgd plot-sine`` for tasks ``indices`` of a :class:`~datamodules.sine.SineTasks` set."""
    steps = module.eval_inner_steps if steps is None else steps
    indices = list(indices)
    low, high = x_range
    grid = torch.linspace(low, high, 200).unsqueeze(-1)
    on_device = grid.to(next(module.parameters()).device)
    plt = pyplot()
    cols = min(4, len(indices))
    rows = math.ceil(len(indices) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, index in zip(axes.flat, indices):
        support_x, support_y, _, _ = task_set[index]
        amplitude, phase = task_set.curve(index)
        with torch.no_grad():
            before = module.model(on_device).cpu()
        ax.plot(grid, amplitude * torch.sin(grid - phase), color="black", linewidth=1.5, label="true sine")
        ax.plot(grid, before, color="#999999", linestyle=":", label="θ (before adaptation)")
        curves = [(1, "#3b75af", "--")] + ([(steps, "#d62728", "-")] if steps != 1 else [])
        for k, color, style in curves:
            fast = module.adapt_task(support_x.to(on_device.device), support_y.to(on_device.device), k)
            with torch.no_grad():
                ax.plot(grid, module(on_device, fast).cpu(), color=color, linestyle=style, label=f"after {k} step{'s' * (k != 1)}")
        ax.scatter(support_x, support_y, color="black", marker="^", s=30, zorder=3, label=f"{len(support_x)} support points")
        ax.set_title(f"{task_set.split} task {index}: A={amplitude:.2f}, φ={phase:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(indices):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def task_figure(module, task: tuple[Tensor, Tensor, Tensor, Tensor], title: str, steps: int | None = None):
    """The figure of ``metasgd plot-tasks`` for one task ``(support_x, support_y, query_x, query_y)``."""
    support_x, support_y, query_x, query_y = (t.cpu() for t in task)
    device = next(module.parameters()).device
    fast = module.adapt_task(support_x.to(device), support_y.to(device), steps)
    with torch.no_grad():
        predicted = module(query_x.to(device), fast).argmax(-1).cpu()

    plt = pyplot()
    cols = max(len(support_x), min(len(query_x), 10))
    query_rows = math.ceil(len(query_x) / cols)
    size = (max(1.2 * cols, 4.8), 1.35 * (1 + query_rows) + 0.4)  # room for the two lines of the title
    fig, axes = plt.subplots(1 + query_rows, cols, figsize=size, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes[0], support_x, support_y.tolist()):
        ax.imshow(_displayable(image), cmap="gray")
        ax.set_title(f"support {label}", fontsize=7)
    for i, (image, truth, guess) in enumerate(zip(query_x, query_y.tolist(), predicted.tolist())):
        ax = axes[1 + i // cols][i % cols]
        ax.imshow(_displayable(image), cmap="gray")
        color = "#2ca02c" if guess == truth else "#d62728"
        ax.set_title(f"{guess} {'✓' if guess == truth else f'✗ ({truth})'}", fontsize=7, color=color)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(color)
            spine.set_linewidth(2)
    accuracy = float((predicted == query_y).float().mean())
    fig.suptitle(f"{title}: {accuracy:.0%} of the queries right\ntop: support; below: predictions "
                 "(true class if wrong)", fontsize=8)
    fig.tight_layout()
    return fig


def _displayable(image: Tensor) -> Tensor:
    """A ``[C, H, W]`` model input as an ``[H, W]`` or ``[H, W, 3]`` image in [0, 1] (its own min and max)."""
    image = image.detach().float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
    return image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
