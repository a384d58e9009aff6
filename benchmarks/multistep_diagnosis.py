"""Why several plain inner steps make Meta-SGD diverge, measured: α, curvature, meta-gradients, per-task losses.

Trains Meta-SGD on 5-shot sine regression with 5 inner steps (the paper's network, α ~ U[0.005, 0.1],
Adam 1e-3, meta-batch 25) twice from the same initialisation and task stream: with the paper's plain
steps (``line_search="off"``) and with backtracking (the default for several steps). Every
``--every`` meta-steps it records, for each run:

* α: min, mean, max and the share of negative entries over all parameters;
* the meta-gradient norm and the support loss after each inner step (mean and max over the meta-batch);
* the 600 fixed test tasks adapted with 5 and with 10 steps: mean, median and largest task MSE, and
  how many tasks end with a non-finite support loss;
* the curvature of the support loss at θ for the median and the worst test task: the largest and
  smallest eigenvalue λ of its Hessian (exact, ``torch.func.hessian``) and the spectral radius of the
  linearised plain step, ρ(I − diag(α) H): above 1, plain steps grow along some direction.

    python -m benchmarks.multistep_diagnosis              # 600 meta-steps per run, every 100

Writes the table to docs/results.md (section ``multistep_diagnosis``) and the records to
benchmarks/results/multistep_diagnosis.json. Core ``MetaSGD`` only (no Lightning), CPU.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

from benchmarks._results import write_results
from datamodules.sine import SineTasks
from metasgd_lightning import MetaSGD, SineMLP

REPO = Path(__file__).resolve().parents[1]

SHOTS, QUERIES, META_BATCH, TEST_TASKS, STEPS, EVAL_STEPS = 5, 10, 25, 600, 5, 10


def _tasks(split: str, length: int, seed: int) -> SineTasks:
    return SineTasks(split, length, SHOTS, QUERIES, seed, (0.1, 5.0), (0.0, math.pi), (-5.0, 5.0))


def _batch(tasks: SineTasks, indices) -> list[torch.Tensor]:
    return [torch.stack(t) for t in zip(*(tasks[i] for i in indices))]


def curvature(meta: MetaSGD, support_x: torch.Tensor, support_y: torch.Tensor) -> dict[str, float]:
    """λ_max and λ_min of the support loss's Hessian at θ, and ρ(I − diag(α) H) of the plain step."""
    params = {n: p.detach() for n, p in meta.model.named_parameters()}
    names, shapes = meta.adapted_names, [params[n].shape for n in meta.adapted_names]
    flat = torch.cat([params[n].flatten() for n in names])

    def loss(vector):
        weights, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            weights[name], offset = vector[offset:offset + size].view(shape), offset + size
        return F.mse_loss(functional_call(meta.model, weights, (support_x,)), support_y)

    h = hessian(loss)(flat)
    alpha = torch.cat([meta.lr(n).detach().expand(params[n].shape).flatten() for n in names])
    eigenvalues = torch.linalg.eigvalsh(h)
    radius = torch.linalg.eigvals(torch.eye(len(flat), dtype=h.dtype) - alpha[:, None] * h).abs().max()
    return {"lambda_max": float(eigenvalues[-1]), "lambda_min": float(eigenvalues[0]), "rho_plain_step": float(radius)}


def evaluate(meta: MetaSGD, test: list[torch.Tensor], steps: int) -> tuple[dict, torch.Tensor]:
    result = meta.adapt_tasks(*test, F.mse_loss, steps=steps, first_order=True, vectorize="loop")
    mse = result.query_loss.detach()
    finite = torch.isfinite(mse) & torch.isfinite(result.support_loss).all(dim=1)
    median = float(mse[finite].median()) if finite.any() else float("nan")
    return ({"mean": float(mse.mean()), "median": median, "max": float(mse.max()),
             "diverged_tasks": int((~finite).sum())}, mse)


def run(line_search: str, iterations: int, every: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    meta = MetaSGD(SineMLP(), init_lr=(0.005, 0.1), inner_steps=STEPS, line_search=line_search)
    optimizer = torch.optim.Adam(meta.parameters(), lr=1e-3)
    train, test = _tasks("train", 10**9, seed), _batch(_tasks("test", TEST_TASKS, seed), range(TEST_TASKS))
    records, start = [], time.perf_counter()
    for step in range(iterations + 1):
        record = {"line_search": line_search, "meta_step": step} if step % every == 0 else None
        if record is not None:
            alpha = torch.cat([meta.lr(n).detach().flatten() for n in meta.adapted_names])
            record["alpha"] = {"min": float(alpha.min()), "mean": float(alpha.mean()), "max": float(alpha.max()),
                               "negative": float((alpha < 0).float().mean())}
            for steps in (STEPS, EVAL_STEPS):
                record[f"test_{steps}_steps"], mse = evaluate(meta, test, steps)
            order = torch.nan_to_num(mse, nan=float("inf")).argsort()
            median = order[len(order) // 2]
            record["median_task"] = {"task": int(median), **curvature(meta, test[0][median], test[1][median])}
            record["worst_task"] = {"task": int(order[-1]), **curvature(meta, test[0][order[-1]], test[1][order[-1]])}
        if step == iterations:
            records.append(record)
            break
        batch = _batch(train, range(step * META_BATCH, (step + 1) * META_BATCH))
        optimizer.zero_grad()
        result = meta.adapt_tasks(*batch, F.mse_loss, vectorize="loop")
        meta_loss = result.query_loss.mean()
        diverged = not (torch.isfinite(meta_loss) and torch.isfinite(result.support_loss).all())
        if not diverged:
            meta_loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(meta.parameters(), float("inf")) if not diverged else float("nan")
        if record is not None or diverged:
            record = record or {"line_search": line_search, "meta_step": step}
            record.update(meta_gradient_norm=float(norm), support_loss_mean=result.support_loss.mean(0).tolist(),
                          support_loss_max=result.support_loss.max(0).values.tolist())
            records.append(record)
            print(_line(record), f"({time.perf_counter() - start:.0f} s)", flush=True)
        if diverged:
            records[-1]["diverged"] = f"training diverged at meta-step {step} (a non-finite support or query loss)"
            print(records[-1]["diverged"], flush=True)
            break
        optimizer.step()
    return records


def _line(r: dict) -> str:
    parts = [f"{r['line_search']:12s} meta-step {r['meta_step']:4d}"]
    if "alpha" in r:
        a = r["alpha"]
        parts.append(f"α [{a['min']:.3f}, {a['mean']:.3f}, {a['max']:.3f}] neg {100 * a['negative']:.0f}%")
        for steps in (STEPS, EVAL_STEPS):
            t = r[f"test_{steps}_steps"]
            parts.append(f"test {steps} steps: mean {t['mean']:.3g} max {t['max']:.3g} diverged {t['diverged_tasks']}")
        parts.append(f"λmax median/worst task {r['median_task']['lambda_max']:.0f}/{r['worst_task']['lambda_max']:.0f}, "
                     f"ρ {r['median_task']['rho_plain_step']:.2f}/{r['worst_task']['rho_plain_step']:.2f}")
    if "meta_gradient_norm" in r:
        parts.append(f"meta-grad {r['meta_gradient_norm']:.3g}, support loss max by step "
                     + " ".join(f"{v:.3g}" for v in r["support_loss_max"]))
    return " | ".join(parts)


def _cell(value: float) -> str:
    return "—" if value != value else (f"{value:.3g}" if abs(value) < 1e4 else f"{value:.1e}")


def section(records: list[dict], command: str) -> str:
    lines = ["| inner loop | meta-step | α min / mean / max (negative) | meta-gradient norm | support loss after each "
             f"step, worst task of the meta-batch | test MSE, {STEPS} steps: mean / max (tasks diverged) | test MSE, "
             f"{EVAL_STEPS} steps: mean / max (tasks diverged) | λ_max median / worst test task | ρ(I − αH) median / worst |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "alpha" not in r:
            lines.append(f"| {r['line_search']} | {r['meta_step']} | | {_cell(r['meta_gradient_norm'])} | "
                         + " → ".join(_cell(v) for v in r["support_loss_max"]) + f" | **{r.get('diverged', '')}** | | | |")
            continue
        a, five, ten = r["alpha"], r[f"test_{STEPS}_steps"], r[f"test_{EVAL_STEPS}_steps"]
        support = " → ".join(_cell(v) for v in r["support_loss_max"]) if "support_loss_max" in r else "—"
        lines.append(
            f"| {r['line_search']} | {r['meta_step']} | {a['min']:.3f} / {a['mean']:.3f} / {a['max']:.3f} ({100 * a['negative']:.0f}%) "
            f"| {_cell(r.get('meta_gradient_norm', float('nan')))} | {support} "
            f"| {_cell(five['mean'])} / {_cell(five['max'])} ({five['diverged_tasks']}) "
            f"| {_cell(ten['mean'])} / {_cell(ten['max'])} ({ten['diverged_tasks']}) "
            f"| {r['median_task']['lambda_max']:.0f} / {r['worst_task']['lambda_max']:.0f} "
            f"| {r['median_task']['rho_plain_step']:.2f} / {r['worst_task']['rho_plain_step']:.2f} |")
    return (
        "## Why several plain steps diverge (sine, 5 inner steps)\n\n"
        f"Command: `{command}` (CPU, core `MetaSGD`, no Lightning). Meta-SGD, 5-shot sine, {STEPS} inner steps in "
        f"training, α ~ U[0.005, 0.1], Adam 1e-3, meta-batch {META_BATCH}; the same initialisation and task stream for "
        f"`off` (the paper's plain steps) and `backtracking`. Test: the {TEST_TASKS} fixed test tasks adapted with "
        f"{STEPS} and with {EVAL_STEPS} steps (a task has diverged when a support loss is not finite). λ: eigenvalues of "
        "the support loss's Hessian at θ (1761 parameters, exact) for the median and the worst test task; ρ(I − αH): "
        "spectral radius of the linearised plain step, above 1 when plain steps grow along some direction "
        "(for a quadratic, ρ > 1 exactly when α·λ > 2 along an eigendirection).\n\n"
        + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    records = []
    for line_search in ("off", "backtracking"):
        records += run(line_search, args.iterations, args.every, args.seed)
    command = "python -m benchmarks.multistep_diagnosis " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = section(records, command.strip())
    print("\n" + text)
    if not args.no_write:
        write_results("multistep_diagnosis", records, text)


if __name__ == "__main__":
    main()
