"""Reproduce the sine-regression table of Meta-SGD (Li et al. 2017): Meta-SGD against MAML, 5/10/20 shots.

Trains each method on the sine protocol (one inner step, Adam with meta learning rate 1e-3, meta-batch
of 25 tasks; Meta-SGD's α uniform in [0.005, 0.1], MAML's fixed rate 0.01) and evaluates each on the
same fixed 600 test tasks, printing MSE ± 95% interval beside the published figures. It then adds a
row per MAML++ inner-loop option (Antoniou et al. 2019) for Meta-SGD at 5 shots with 3 inner steps,
against the same setting without the option.

    python benchmarks/sine_table.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/sine_table.py             # the full budget (see FULL_ITERATIONS)

Writes the table and the command to docs/results.md and the records to
benchmarks/results/sine_table.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402
from datamodules import SineDataModule  # noqa: E402
from metasgd_lightning import MetaSGDLightningModule, SineMLP  # noqa: E402
from metasgd_lightning._quiet import silence_lightning_noise  # noqa: E402

QUICK_ITERATIONS, FULL_ITERATIONS = 400, 20_000
META_BATCH, QUERIES, TEST_TASKS = 25, 10, 600
# Li et al. 2017, 5-shot (MSE ± 95% interval, one inner step); the 10- and 20-shot figures are not
# entered here because they were not checked against the paper.
PUBLISHED = {("MAML", 5): "1.13 ± 0.18", ("Meta-SGD", 5): "0.90 ± 0.16"}
METHODS = {"Meta-SGD": dict(init_lr=(0.005, 0.1), learn_lr=True), "MAML": dict(init_lr=0.01, learn_lr=False)}
OPTION_STEPS = 3


def options(iterations: int) -> dict[str, dict]:
    """MAML++ options, each alone; epochs are tenths of the run."""
    return {
        "none (3 steps)": {},
        "per-step rates": dict(per_step_lr=True),
        "multi-step loss": dict(multi_step_loss=True, multi_step_loss_epochs=5),
        "derivative-order annealing": dict(first_order_epochs=5),
        "cosine meta-lr": dict(lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=iterations)),
    }


def run(method: str, option: str, shots: int, iterations: int, inner_steps: int, seed: int, **extra) -> dict:
    torch.manual_seed(seed)
    data = SineDataModule(shots=shots, queries=QUERIES, meta_batch_size=META_BATCH, seed=seed,
                          train_tasks_per_epoch=max(META_BATCH, iterations * META_BATCH // 10),
                          val_tasks=META_BATCH, test_tasks=TEST_TASKS)
    module = MetaSGDLightningModule(SineMLP(), task="regression", inner_steps=inner_steps, **METHODS[method], **extra)
    trainer_args = dict(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    L.Trainer(max_steps=iterations, limit_val_batches=0, **trainer_args).fit(module, data)
    seconds = time.perf_counter() - start
    metrics = L.Trainer(**trainer_args).test(module, data, verbose=False)[0]
    record = dict(method=method, option=option, shots=shots, inner_steps=inner_steps, mse=metrics["test/mse"],
                  ci95=metrics["test/mse_ci95"], iterations=iterations, seconds=round(seconds, 1))
    print(f"{method:9s} {option:28s} {shots:2d}-shot  MSE {record['mse']:.3f} ± {record['ci95']:.3f}  "
          f"({iterations} iterations, {seconds:.0f} s)", flush=True)
    return record


def table(records: list[dict]) -> str:
    lines = ["| method | option | shots | inner steps | MSE ± 95% CI (ours) | published (Li et al. 2017) | iterations | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        published = PUBLISHED.get((r["method"], r["shots"]), "—") if r["option"] == "none" else "—"
        lines.append(f"| {r['method']} | {r['option']} | {r['shots']} | {r['inner_steps']} | {r['mse']:.3f} ± {r['ci95']:.3f} "
                     f"| {published} | {r['iterations']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def section(records: list[dict], command: str) -> str:
    return (
        "## Sine regression: Meta-SGD against MAML\n\n"
        f"Command: `{command}` (CPU, {torch.get_num_threads()} threads). Test MSE over the same fixed "
        f"{TEST_TASKS} tasks ({QUERIES} query points each), mean ± 1.96·std/√n. Training: meta-batch {META_BATCH}, "
        "Adam 1e-3, one inner step; Meta-SGD α ~ U[0.005, 0.1], MAML α = 0.01. The option rows are Meta-SGD "
        f"at 5 shots with {OPTION_STEPS} inner steps, each MAML++ option alone against `none (3 steps)`.\n\n"
        f"{table(records)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations per run instead of {FULL_ITERATIONS}")
    parser.add_argument("--iterations", type=int, help="override the number of meta-training iterations per run")
    parser.add_argument("--shots", type=int, nargs="*", default=[5, 10, 20],
                        help="shot counts of the plain MAML and Meta-SGD rows (none: skip them)")
    parser.add_argument("--no-options", action="store_true", help="skip the MAML++ option rows")
    parser.add_argument("--options", nargs="+", metavar="NAME", help="run only these option rows, e.g. 'cosine meta-lr'")
    parser.add_argument("--no-write", action="store_true",
                        help="print the table only (for a partial run: leave docs/results.md and the JSON as they are)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else FULL_ITERATIONS)
    silence_lightning_noise()
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    rows = options(iterations)
    unknown = set(args.options or ()) - set(rows)
    if unknown:
        parser.error(f"--options: unknown {sorted(unknown)}; known: {list(rows)}")
    records = [run(method, "none", shots, iterations, 1, args.seed) for shots in args.shots for method in ("MAML", "Meta-SGD")]
    if not args.no_options:
        records += [run("Meta-SGD", name, 5, iterations, OPTION_STEPS, args.seed, **extra)
                    for name, extra in rows.items() if not args.options or name in args.options]
    print("\n" + table(records))
    command = "python benchmarks/sine_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if not args.no_write:
        write_results("sine_table", records, section(records, command.strip()))


if __name__ == "__main__":
    main()
