"""Sine regression (Li et al. 2017, Sec. 4.1): Meta-SGD against MAML, one and several inner steps, MAML++ options.

Every row trains on the sine protocol (Adam with meta learning rate 1e-3, meta-batch of 25 tasks, 10
query points per task; Meta-SGD's α uniform in [0.005, 0.1], MAML's fixed rate 0.01) for the same
number of meta-steps on the same task stream, then scores the same fixed 600 test tasks, each at the
row's own number of inner steps and at 10 (more steps at test than in training, as users run it).
Rows:

* MAML and Meta-SGD, one inner step, 5/10/20 shots: the paper's table;
* Meta-SGD with 3 and 5 inner steps (5 shots), with the default line search (backtracking for
  several steps) and, as the ablation that shows the divergence it prevents, with ``line_search="off"``;
  MAML with 5 steps;
* each MAML++ option alone on 5-step Meta-SGD (Antoniou et al. 2019).

For every row it prints the test MSE ± 95% interval (1.96·std/√n over tasks) and the largest task MSE
over the median task MSE (a row diverges on some tasks when this is huge).

    python -m benchmarks.sine_table --quick            # 400 meta-steps per row
    python -m benchmarks.sine_table --jobs 2           # 2000 meta-steps per row, two rows at a time

Writes the table and the command to docs/results.md and the records to benchmarks/results/sine_table.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial
from pathlib import Path

import torch

from benchmarks._results import write_results
from benchmarks._training import fit_and_test, max_over_median, quiet, run_rows
from datamodules import SineDataModule
from metasgd_lightning import MetaSGDLightningModule, SineMLP

REPO = Path(__file__).resolve().parents[1]

QUICK_ITERATIONS, DEFAULT_ITERATIONS = 400, 2000
META_BATCH, QUERIES, VAL_TASKS, TEST_TASKS, EVAL_STEPS = 25, 10, 200, 600, 10
# Li et al. 2017, 5-shot (MSE ± 95% interval, one inner step); the 10- and 20-shot figures are not
# entered here because they were not checked against the paper.
PUBLISHED = {("MAML", 5): "1.13 ± 0.18", ("Meta-SGD", 5): "0.90 ± 0.16"}
# MAML is the published algorithm: a fixed rate and plain steps (no line search), in training and at test.
METHODS = {"Meta-SGD": dict(init_lr=(0.005, 0.1), learn_lr=True),
           "MAML": dict(init_lr=0.01, learn_lr=False, line_search="off")}


def rows(iterations: int) -> list[dict]:
    """Every row of the table: method, option, shots, inner steps and the module's extra arguments."""
    table = [dict(method=m, option="none", shots=k, steps=1, extra={}) for k in (5, 10, 20) for m in ("MAML", "Meta-SGD")]
    for steps in (3, 5):
        table.append(dict(method="Meta-SGD", option="none", shots=5, steps=steps, extra={}))
        table.append(dict(method="Meta-SGD", option="line search off", shots=5, steps=steps, extra=dict(line_search="off")))
    table.append(dict(method="MAML", option="none", shots=5, steps=5, extra={}))
    options = {  # MAML++, each alone; epochs are tenths of the run
        "per-step rates": dict(per_step_lr=True),
        "multi-step loss": dict(multi_step_loss=True, multi_step_loss_epochs=5),
        "derivative-order annealing": dict(first_order_epochs=5),
        "cosine meta-lr": dict(lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=iterations)),
    }
    table += [dict(method="Meta-SGD", option=name, shots=5, steps=5, extra=extra) for name, extra in options.items()]
    for row in table:
        row.update(iterations=iterations, label=f"{row['method']} {row['option']}, {row['shots']}-shot, "
                                                f"{row['steps']} step{'s' if row['steps'] > 1 else ''}")
    return table


def run(row: dict) -> dict:
    """Train and test one row (in a worker process)."""
    quiet()
    seed = row["seed"]
    torch.manual_seed(seed)
    iterations = row["iterations"]
    data = SineDataModule(shots=row["shots"], queries=QUERIES, meta_batch_size=META_BATCH, seed=seed,
                          train_tasks_per_epoch=max(META_BATCH, iterations * META_BATCH // 10),
                          val_tasks=VAL_TASKS, test_tasks=TEST_TASKS)
    module = MetaSGDLightningModule(SineMLP(), task="regression", inner_steps=row["steps"], **METHODS[row["method"]],
                                    **row["extra"])
    result = fit_and_test(module, data, iterations, sorted({row["steps"], EVAL_STEPS}), validate=True)
    record = dict(method=row["method"], option=row["option"], shots=row["shots"], inner_steps=row["steps"],
                  iterations=iterations, steps_done=result["steps_done"], seconds=result["seconds"], seed=seed,
                  line_search=module.meta_learner.line_search, evaluations=[])
    if "diverged" in result:
        record["diverged"] = result["diverged"]
    if "val" in result:  # at the row's own steps: the only score that may choose a setting
        record["val"] = result["val"].get("diverged") or result["val"]["mean"]
    for eval_steps, scores in result.get("eval", {}).items():
        entry = dict(eval_inner_steps=eval_steps)
        if "diverged" in scores:
            entry["diverged"] = scores["diverged"]
        else:
            entry.update(mse=scores["mean"], ci95=scores["ci95"], max_over_median=max_over_median(scores["values"]))
        record["evaluations"].append(entry)
    record["summary"] = f"{row['label']}: " + (record.get("diverged") or "; ".join(
        f"{e['eval_inner_steps']} steps at test " + (e.get("diverged") or f"MSE {e['mse']:.3f} ± {e['ci95']:.3f}, "
                                                      f"max/median {e['max_over_median']:.0f}")
        for e in record["evaluations"]))
    return record


def stable(entry: dict) -> bool:
    """The acceptance rule: a 95% interval narrower than a fifth of the mean, and no task above 10x the median."""
    return "mse" in entry and entry["ci95"] < entry["mse"] / 5 and entry["max_over_median"] <= 10


def table(records: list[dict]) -> str:
    lines = ["| method | option | shots | inner steps (train) | inner steps (test) | validation MSE | test MSE ± 95% CI "
             "| max / median task MSE | published (Li et al. 2017) | meta-steps | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        published = PUBLISHED.get((r["method"], r["shots"]), "—") if r["option"] == "none" and r["inner_steps"] == 1 else "—"
        head = f"| {r['method']} | {r['option']} | {r['shots']} | {r['inner_steps']} "
        tail = f"| {r['iterations']} | {r['seconds']:.0f} |"
        if "diverged" in r:
            lines.append(f"{head}| — | — | diverged in {r['diverged'].split(':')[0]} | — | {published} {tail}")
            continue
        for e in r["evaluations"]:
            if "diverged" in e:
                score, ratio = "diverged at test (a support loss became infinite)", "—"
            else:
                score, ratio = f"{e['mse']:.3f} ± {e['ci95']:.3f}", f"{e['max_over_median']:.1f}"
            own = e["eval_inner_steps"] == r["inner_steps"]
            val = r.get("val", "—") if own else ""
            val = f"{val:.3f}" if isinstance(val, float) else ("diverged" if val not in ("", "—") else val)
            lines.append(f"{head}| {e['eval_inner_steps']} | {val} | {score} | {ratio} "
                         f"| {published if e['eval_inner_steps'] == r['inner_steps'] else '—'} {tail}")
    return "\n".join(lines)


def section(records: list[dict], command: str, threads: str) -> str:
    return (
        "## Sine regression: Meta-SGD against MAML, one and several inner steps\n\n"
        f"Command: `{command}` (CPU, {threads}). Seed {records[0]['seed']} for every row (the same task stream "
        f"and initialisation). Test MSE over the same fixed {TEST_TASKS} tasks ({QUERIES} query points each), mean ± "
        f"1.96·std/√n; each row at its own number of inner steps and at {EVAL_STEPS}. Validation MSE on {VAL_TASKS} tasks of "
        "the validation stream at the row's own steps: the only score that may choose a setting. \"max / median\" is the largest "
        "task MSE over the median task MSE. Training: meta-batch 25, Adam 1e-3; Meta-SGD α ~ U[0.005, 0.1] learned, "
        "MAML α = 0.01 fixed with plain steps (the published algorithm); Meta-SGD's `line_search` at its default "
        "(`auto`: backtracking for several steps, the paper's plain "
        "step for one) unless the option says `line search off`. The option rows are 5-step Meta-SGD with one "
        "MAML++ option each.\n\n"
        f"{table(records)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} meta-steps per row instead of {DEFAULT_ITERATIONS}")
    parser.add_argument("--iterations", type=int, help="override the number of meta-training steps per row")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="run only the rows whose label contains one of these")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once, in separate processes")
    parser.add_argument("--no-write", action="store_true",
                        help="print the table only (for a partial run: leave docs/results.md and the JSON as they are)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)
    quiet()
    selected = [r for r in rows(iterations) if not args.only or any(text in r["label"] for text in args.only)]
    if not selected:
        parser.error(f"--only {args.only}: no row matches; rows: {[r['label'] for r in rows(iterations)]}")
    for row in selected:
        row["seed"] = args.seed
    command = "python -m benchmarks.sine_table " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    threads = f"{args.jobs} processes of {max(1, torch.get_num_threads() // args.jobs)} thread(s)" if args.jobs > 1 \
        else f"{torch.get_num_threads()} threads"

    def write(records: list[dict]) -> None:  # after every row: a stopped run keeps the rows it finished
        if records and not args.no_write:
            write_results("sine_table", records, section(records, command.strip(), threads))

    records = [r for r in run_rows(selected, run, args.jobs, on_record=write) if "error" not in r]
    print("\n" + table(records))
    for r in records:
        bad = [e["eval_inner_steps"] for e in r.get("evaluations", []) if not stable(e)]
        if "diverged" in r or bad:
            print(f"not stable by the rule (CI < mean/5, max/median <= 10): {r['summary']}")


if __name__ == "__main__":
    main()
