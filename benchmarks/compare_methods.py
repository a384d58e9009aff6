"""MAML, Meta-SGD and Reptile side by side: at the same number of meta-steps, and at the same wall-clock time.

The design document compares the three methods by what each learns, its inner loop and its cost
("MAML high, Meta-SGD higher, Reptile low"). This benchmark measures those columns on two problems,
with every method on the same task stream (same data module, seed and meta-batch):

* sine regression, 5-shot (meta-batch 25);
* real Omniglot 5-way 1-shot on held-out characters (``../shared/data/omniglot/``, the characters of
  its 5 alphabets split 0.6/0.15/0.25, meta-batch 8, one query per class).

Each method runs with its own published settings (``METHODS``; Meta-SGD with the settings of our
configs) for ``--steps`` meta-steps. A second pass gives every method the same wall-clock budget, the
training time of Meta-SGD in the first pass: each method then trains for as many meta-steps as its
measured seconds per meta-step allow (its schedules, such as Reptile's annealed ε, sized to them).
Every row runs in a fresh process and reports the test score ± 95% interval over the same fixed
test tasks (at the method's own number of test steps), meta-parameters (θ and α counted
separately), tasks/s, seconds per meta-step and peak memory above the process's start.

    python benchmarks/compare_methods.py                  # sine and Omniglot, both passes
    python benchmarks/compare_methods.py --problems sine  # sine only

Writes the tables to docs/results.md (section ``compare_methods``) and the records to
benchmarks/results/compare_methods.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402
from benchmarks._training import fit_and_test, quiet, run_rows  # noqa: E402
from datamodules import OmniglotDataModule, SineDataModule  # noqa: E402
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, ReptileLightningModule, SineMLP  # noqa: E402

SHARED_ZIP = REPO.parent / "shared/data/omniglot/images_background_small1.zip"
TEST_TASKS = 600
# Each method's settings per problem: (module class, arguments, words for the table's "inner loop" column).
METHODS = {
    "sine": {
        "MAML": (MetaSGDLightningModule, dict(init_lr=0.01, learn_lr=False, line_search="off", inner_steps=1,
                                              eval_inner_steps=10), "1 SGD step of fixed α = 0.01 (10 at test)"),
        "Meta-SGD": (MetaSGDLightningModule, dict(init_lr=(0.005, 0.1), inner_steps=3, eval_inner_steps=10),
                     "3 steps of learned α ⊙ ∇L, backtracking (10 at test)"),
        "Reptile": (ReptileLightningModule, dict(inner_optimizer="sgd", inner_lr=0.02, inner_steps=5,
                                                 inner_batch_size=10, eval_inner_steps=32),
                    "5 SGD steps, lr 0.02, mini-batches of 10 (32 at test)"),
    },
    "omniglot": {
        "MAML": (MetaSGDLightningModule, dict(init_lr=0.4, learn_lr=False, line_search="off", inner_steps=1,
                                              eval_inner_steps=3), "1 SGD step of fixed α = 0.4 (3 at test)"),
        "Meta-SGD": (MetaSGDLightningModule, dict(init_lr=(0.005, 0.1), lr_meta_lr=5e-3, inner_steps=1,
                                                  eval_inner_steps=3),
                     "1 step of learned α ⊙ ∇L, α's meta-lr 5e-3 (3 at test, backtracking)"),
        "Reptile": (ReptileLightningModule, dict(inner_optimizer="adam", inner_lr=1e-3, inner_steps=5,
                                                 inner_batch_size=10, eval_inner_steps=50, eval_inner_batch_size=5),
                    "5 Adam steps (β1 = 0), lr 1e-3 (50 at test)"),
    },
}
SECOND_ORDER = {"MAML": "second order", "Meta-SGD": "second order", "Reptile": "first order"}


def _data(row: dict) -> L.LightningDataModule:
    if row["problem"] == "sine":
        return SineDataModule(shots=5, queries=10, meta_batch_size=25, train_tasks_per_epoch=25 * row["steps"],
                              val_tasks=25, test_tasks=TEST_TASKS, seed=row["seed"])
    return OmniglotDataModule(root=row["root"], layout="folder", fractions=(0.6, 0.15, 0.25), ways=5, shots=1,
                              queries=1, meta_batch_size=8, train_tasks_per_epoch=8 * row["steps"], val_tasks=8,
                              test_tasks=TEST_TASKS, seed=row["seed"], num_workers=0)


def run(row: dict) -> dict:
    """Train and test one method on one problem (in a fresh worker process)."""
    quiet()
    L.seed_everything(row["seed"], verbose=False)
    cls, kwargs, inner = METHODS[row["problem"]][row["method"]]
    if row["problem"] == "sine":
        module = cls(SineMLP(), task="regression", **kwargs)
    else:
        module = cls(ConvNet4(out_features=5, in_channels=1, hidden_channels=64, image_size=28, downsample="stride"),
                     task="classification", **kwargs)
    theta = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    lrs = getattr(module.meta_learner, "lrs", None)
    alpha = sum(p.numel() for p in lrs.parameters() if p.requires_grad) if lrs is not None else 0
    data = _data(row)
    result = fit_and_test(module, data, row["steps"], [module.eval_inner_steps])
    record = {k: v for k, v in row.items() if k not in ("root", "label")}
    record.update(inner_loop=inner, order=SECOND_ORDER[row["method"]], theta=theta, alpha=alpha,
                  seconds=result["seconds"], steps_done=result["steps_done"],
                  peak_memory_mib=result.get("peak_memory_mib"), eval_inner_steps=module.eval_inner_steps)
    tasks_per_step = 25 if row["problem"] == "sine" else 8
    record["seconds_per_step"] = result["seconds"] / max(1, result["steps_done"])
    record["tasks_per_second"] = tasks_per_step / record["seconds_per_step"]
    if "diverged" in result:
        record["diverged"] = result["diverged"]
    else:
        scores = result["eval"][module.eval_inner_steps]
        if "diverged" in scores:
            record["diverged"] = scores["diverged"]
        else:
            scale = 1 if row["problem"] == "sine" else 100
            record.update(score=scale * scores["mean"], ci95=scale * scores["ci95"])
    unit = "MSE" if row["problem"] == "sine" else "accuracy"
    record["summary"] = f"{row['label']}: " + (record.get("diverged") or (
        f"test {unit} {record['score']:.3f} ± {record['ci95']:.3f}, {record['steps_done']} steps in "
        f"{record['seconds']:.0f} s, {record['peak_memory_mib']:.0f} MiB"))
    return record


def table(records: list[dict]) -> str:
    lines = ["| problem | budget | method | learned (meta-parameters) | inner loop | test score ± 95% CI | meta-steps "
             "| training seconds | s / meta-step | tasks / s | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        learned = f"θ {r['theta']:,}" + (f" + α {r['alpha']:,}" if r["alpha"] else "")
        if "diverged" in r:
            score = "diverged"
        elif r["problem"] == "sine":
            score = f"MSE {r['score']:.3f} ± {r['ci95']:.3f}"
        else:
            score = f"{r['score']:.2f}% ± {r['ci95']:.2f}%"
        lines.append(f"| {r['problem']} | {r['budget']} | {r['method']} | {learned} | {r['inner_loop']}; {r['order']} "
                     f"| {score} | {r['steps_done']} | {r['seconds']:.0f} | {r['seconds_per_step']:.3f} "
                     f"| {r['tasks_per_second']:.1f} | +{r['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines)


def section(records: list[dict], command: str, threads: str) -> str:
    return (
        "## MAML, Meta-SGD and Reptile: the same meta-steps, and the same wall-clock time\n\n"
        f"Command: `{command}` (CPU, {threads}; every row in a fresh process). Same task stream for every method "
        f"(seed {records[0]['seed']}): sine 5-shot, meta-batch 25; Omniglot 5-way 1-shot on held-out characters of "
        "the \"background small 1\" split (0.6/0.15/0.25), meta-batch 8, one query per class, strided 64-channel "
        f"ConvNet4. Test score over the same {TEST_TASKS} fixed tasks at each method's own number of test steps, mean "
        "± 1.96·std/√n. \"equal time\" gives each method the training time of Meta-SGD at equal steps, converted to "
        "meta-steps by its measured seconds per step. Peak memory: the process's peak resident memory above "
        "what it held before training.\n\n"
        f"{table(records)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", choices=["sine", "omniglot"], default=["sine", "omniglot"])
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 2000], help="meta-steps, one per problem")
    parser.add_argument("--zip", type=Path, default=SHARED_ZIP, help="images_background_small1.zip")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once (timings are cleanest with 1)")
    parser.add_argument("--no-equal-time", action="store_true", help="only the equal-steps pass")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.steps) != len(args.problems):
        parser.error(f"--steps needs one value per problem {args.problems}; got {args.steps}")
    quiet()
    command = "python benchmarks/compare_methods.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    threads = f"{args.jobs} processes of {max(1, torch.get_num_threads() // args.jobs)} thread(s)" if args.jobs > 1 \
        else f"{torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory(prefix="omniglot_") as tmp:
        root = ""
        if "omniglot" in args.problems:
            if not args.zip.is_file():
                parser.error(f"--zip: no file at {args.zip}; pass the Omniglot zip")
            with zipfile.ZipFile(args.zip) as archive:
                archive.extractall(tmp)
            root = str(Path(tmp) / args.zip.stem)
        done: list[dict] = []

        def write(records: list[dict]) -> None:
            if not args.no_write and done + records:
                rows_so_far = done + records
                write_results("compare_methods", [{k: v for k, v in r.items() if k != "summary"} for r in rows_so_far],
                              section(rows_so_far, command.strip(), threads))

        rows = [dict(problem=problem, method=method, steps=steps, budget=f"{steps} meta-steps", seed=args.seed, root=root,
                     label=f"{problem} {method}, {steps} meta-steps")
                for problem, steps in zip(args.problems, args.steps) for method in METHODS[problem]]
        done += [r for r in run_rows(rows, run, args.jobs, on_record=write, fresh_processes=True) if "error" not in r]
        if not args.no_equal_time:
            equal_time = []
            for problem in args.problems:
                reference = next(r for r in done if r["problem"] == problem and r["method"] == "Meta-SGD")
                budget = reference["seconds"]
                for r in done:
                    if r["problem"] == problem and r["method"] != "Meta-SGD":
                        steps = max(1, round(budget / r["seconds_per_step"]))
                        equal_time.append(dict(problem=problem, method=r["method"], steps=steps, seed=args.seed, root=root,
                                               budget=f"{budget:.0f} s (Meta-SGD's)",
                                               label=f"{problem} {r['method']}, {steps} meta-steps (≈ {budget:.0f} s)"))
            done += [r for r in run_rows(equal_time, run, args.jobs, on_record=write, fresh_processes=True)
                     if "error" not in r]
    print("\n" + table(done))


if __name__ == "__main__":
    main()
