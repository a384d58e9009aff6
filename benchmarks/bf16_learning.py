"""bf16 autocast on CPU as learning, not only speed: Meta-SGD under ``32-true`` and ``bf16-mixed``, compared at equal
meta-steps and at equal wall time.

The throughput benchmark measures bf16 autocast as a faster step on CPU; this one measures what a run *learns*
under it. Method: Meta-SGD (``MetaSGDLightningModule``), second order, with the settings of our configs, on the
two problems of ``benchmarks.compare_methods`` (its "Meta-SGD" rows, its data modules and test tasks):

* sine regression, 5-shot (3 inner steps with backtracking, 10 at test; meta-batch 25);
* real Omniglot 5-way 1-shot on held-out characters (``../shared/data/omniglot/``, the characters of its 5
  alphabets split 0.6/0.15/0.25; 1 inner step, 3 at test; α's meta-lr 5e-3; meta-batch 8).

Three measurements, as in ``benchmarks.compare_methods`` (whose timing and training helpers this reuses):

1. **Timing, by turns**: per problem one fresh process builds the module once per precision and runs
   ``--timing-steps`` meta-steps of each under ``Trainer.fit``, the precisions taking turns over ``--rounds``
   rounds (order rotated); median seconds per step over the steps during which other processes kept at most
   ``--busy-threshold`` CPUs busy (``benchmarks.throughput.StepClock``).
2. **Equal meta-steps**: each precision trains ``--steps`` meta-steps in a fresh process (same seed, same task
   stream, same initialisation), then is tested on the same fixed test tasks, under its own precision (what a user
   of that precision gets) and, for bf16, again in float32 (what it learned, without bf16 at test). The
   difference to the float32 run is paired over the same test tasks (mean ± 1.96·std/√n of the per-task
   differences).
3. **Equal wall time**: both precisions get float32's training time at equal steps (its steps × its timed
   s/step), converted to meta-steps by each precision's own timed s/step (``equal_time_steps``).

    OMP_NUM_THREADS=1 python -m benchmarks.bf16_learning --jobs 1     # sine and Omniglot, all passes
    python -m benchmarks.bf16_learning --quick --allow-busy --no-write  # a smoke run (a few minutes)

Writes docs/results.md (section ``bf16_learning``) and benchmarks/results/bf16_learning.json (not with
``--no-write``, which prints the section instead).
"""

from __future__ import annotations

import argparse
import math
import os

import lightning as L
import torch

from benchmarks._training import TRAINER_ARGS, first_sentence, fit_and_test, quiet, run_rows
from benchmarks.compare_methods import (
    SectionWriter,
    _restore_env,
    _spawn_env,
    add_run_arguments,
    build_data,
    build_module,
    cost_cells,
    load_average,
    meta_parameters,
    omniglot_root,
    start_run,
    time_problems,
)
from metasgd_lightning import InnerLoopDivergedError

METHOD = "Meta-SGD"  # the row of benchmarks.compare_methods.METHODS: the settings of our configs
PRECISIONS = ("32-true", "bf16-mixed")
REFERENCE = "32-true"  # equal wall time: this precision's training time at equal steps


def equal_time_steps(reference_steps: int, seconds_per_step: dict[str, float],
                     reference: str = REFERENCE) -> tuple[float, dict[str, int]]:
    """The equal-wall-time budget: (the reference's seconds, ``reference_steps`` × its s/step; every precision's
    meta-steps in that time, by its own s/step, at least 1). The reference keeps its own steps."""
    budget = reference_steps * seconds_per_step[reference]
    steps = {p: reference_steps if p == reference else max(1, round(budget / s)) for p, s in seconds_per_step.items()}
    return budget, steps


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """Mean and 95% half-interval (1.96·std/√n) of the per-task differences ``values - reference`` (same tasks)."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired over the same tasks: got {len(values)} and {len(reference)} values")
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    ci = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "ci95": ci}


def _scores(module: L.LightningModule, scale: float) -> dict:
    result = module.test_results[module.metric_names[-1]]
    return {"score": scale * float(result["mean"]), "ci95": scale * float(result["ci95"]),
            "values": [scale * float(v) for v in result["values"]]}


def run(row: dict) -> dict:
    """Train Meta-SGD on one problem under one precision and test it (in a fresh worker process)."""
    quiet()
    L.seed_everything(row["seed"], verbose=False)
    problem, precision = row["problem"], row["precision"]
    module, _ = build_module(problem, METHOD)
    theta, alpha = meta_parameters(module)
    data, info = build_data(problem, METHOD, row["steps"], row["seed"], row["root"], row["test_tasks"])
    result = fit_and_test(module, data, row["steps"], [module.eval_inner_steps], trainer_args={"precision": precision})
    record = {k: v for k, v in row.items() if k not in ("root", "label")}
    record.update(theta=theta, alpha=alpha, seconds=result["seconds"], steps_done=result["steps_done"],
                  peak_memory_mib=result.get("peak_memory_mib"), eval_inner_steps=module.eval_inner_steps,
                  stream=info["stream"], tasks_per_step=info["tasks_per_step"],
                  fit_seconds_per_step=result["seconds"] / max(1, result["steps_done"]))
    scale = 1.0 if problem == "sine" else 100.0
    unit = "MSE" if problem == "sine" else "accuracy"
    if "diverged" in result:
        record["diverged"] = result["diverged"]
    else:
        scores = result["eval"][module.eval_inner_steps]
        if "diverged" in scores:
            record["test_diverged"] = scores["diverged"]
        else:
            record.update(score=scale * scores["mean"], ci95=scale * scores["ci95"],
                          values=[scale * v for v in scores["values"]])
        if precision != "32-true":  # what it learned, tested without bf16
            try:
                L.Trainer(**TRAINER_ARGS).test(module, data, verbose=False)
                record["fp32_test"] = _scores(module, scale)
            except InnerLoopDivergedError as error:
                record["fp32_test"] = {"diverged": first_sentence(error)}
    said = record.get("diverged") or record.get("test_diverged") or (
        f"test {unit} {record['score']:.3f} ± {record['ci95']:.3f}")
    record["summary"] = f"{row['label']}: {said}, {record['steps_done']} steps in {record['seconds']:.0f} s"
    return record


# -- the section ------------------------------------------------------------------------------------------------------


def _score_text(problem: str, r: dict | None) -> str:
    if r is None:
        return "–"
    if "diverged" in r:
        return f"diverged ({r['diverged']})"
    return f"MSE {r['score']:.3f} ± {r['ci95']:.3f}" if problem == "sine" else f"{r['score']:.2f}% ± {r['ci95']:.2f}%"


def _delta_text(problem: str, values: list[float] | None, reference: list[float] | None) -> str:
    if not values or not reference:
        return "–"
    d = paired_difference(values, reference)
    return f"{d['mean']:+.3f} ± {d['ci95']:.3f}" if problem == "sine" else f"{d['mean']:+.2f} ± {d['ci95']:.2f} pts"


def _own_test(r: dict) -> dict:
    if "diverged" in r or "test_diverged" in r:
        return {"diverged": r.get("diverged") or r["test_diverged"]}
    return r


def table(records: list[dict], reference: dict[str, dict]) -> str:
    lines = ["| problem | budget | precision | test score ± 95% CI (run's precision) | bf16 − fp32 (paired) "
             "| test score in fp32 | bf16 − fp32 (paired, both tested in fp32) | meta-steps | training seconds "
             "| s / meta-step (turns) | tasks / s | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        problem, ref = r["problem"], reference.get(r["problem"], {})
        fp32 = r.get("fp32_test") if r["precision"] != "32-true" else (r if "values" in r else None)
        is_ref = r["precision"] == "32-true"
        delta = "–" if is_ref else _delta_text(problem, r.get("values"), ref.get("values"))
        delta32 = "–" if is_ref else _delta_text(problem, (fp32 or {}).get("values"), ref.get("values"))
        per_step, rate, memory = cost_cells(r)
        lines.append(f"| {problem} | {r['budget']} | {r['precision']} | {_score_text(problem, _own_test(r))} | {delta} "
                     f"| {_score_text(problem, fp32)} | {delta32} | {r['steps_done']} | {r['seconds']:.0f} "
                     f"| {per_step} | {rate} | {memory} |")
    return "\n".join(lines)


def findings(records: list[dict], reference: dict[str, dict]) -> str:
    """One line per bf16 row: the paired difference to fp32 at equal steps, and whether its interval holds 0."""
    out = []
    for r in records:
        ref = reference.get(r["problem"], {})
        if r["precision"] == "32-true" or not ref.get("values"):
            continue
        lower_is_better = r["problem"] == "sine"
        label = f"{r['problem']}, {r['budget']}, bf16 ({r['steps_done']} steps)"
        if not r.get("values"):
            out.append(f"- {label}: {r.get('diverged') or r.get('test_diverged')} (float32 did not)")
            continue
        d = paired_difference(r["values"], ref["values"])
        worse = d["mean"] > 0 if lower_is_better else d["mean"] < 0
        if abs(d["mean"]) <= d["ci95"]:
            verdict = "no difference the 95% interval can tell"
        else:
            verdict = f"worse than float32 (seed {r['seed']})" if worse else f"better than float32 (seed {r['seed']})"
        unit = "" if lower_is_better else " points"
        out.append(f"- {label}: {d['mean']:+.3f}{unit} ± {d['ci95']:.3f} against the float32 run ({ref['steps_done']} "
                   f"steps), tested under its own precision: {verdict}.")
    return "\n".join(out)


def section(records: list[dict], timing: dict, meta: dict) -> str:
    reference = {r["problem"]: r for r in records if r["precision"] == REFERENCE and r["pass"] == "steps"
                 and "values" in r}
    groups = [("Equal meta-steps", lambda r: r["pass"] == "steps"),
              ("Equal wall time (float32's training time at equal steps)",
               lambda r: r["pass"] == "time" or (r["precision"] == REFERENCE and r["pass"] == "steps"))]
    tables = "\n\n".join(f"### {title}\n\n{table([r for r in records if keep(r)], reference)}" for title, keep in groups
                         if any(keep(r) for r in records))
    timing_lines = "\n".join(
        f"- {problem}: " + "; ".join(f"{name} {t['median']:.3f} s ({t['min']:.3f}–{t['max']:.3f}, {t['clean']}/{t['total']} "
                                      "steps alone)" for name, t in per.items())
        + (f"; bf16 / fp32 = {per['bf16-mixed']['median'] / per['32-true']['median']:.2f}"
           if {"bf16-mixed", "32-true"} <= set(per) else "")
        for problem, per in timing.items())
    return (
        "## bf16 autocast on CPU: does Meta-SGD learn as well? (equal meta-steps, equal wall time)\n\n"
        f"Command: `{meta['command']}`; seed {meta['seed']}; budget {meta['budget']}; {meta['test_tasks']} fixed test "
        f"tasks per problem; {meta['date']}; {meta['machine']}. Load average at the start: {meta['load']}; at the end: "
        f"{meta.get('load_end', '–')}.\n\n"
        "Meta-SGD, second order, the settings of our configs (the `Meta-SGD` rows of `benchmarks.compare_methods`): "
        "sine 5-shot (3 inner steps with backtracking, 10 at test; test tasks 5 + 10 points; meta-batch 25); Omniglot "
        "5-way 1-shot on held-out characters of the \"background small 1\" split (0.6/0.15/0.25; 1 inner step, 3 at "
        "test; α's meta-lr 5e-3; test tasks 1 drawing + 1 query per class; meta-batch 8; strided 64-channel ConvNet4). "
        "Both precisions start from the same initialisation and meet the same training tasks; `precision=\"32-true\"` "
        "against `precision=\"bf16-mixed\"` (Lightning's CPU autocast to bfloat16; weights, optimiser state and the "
        "meta-update stay float32). Test score over the same fixed test tasks, mean ± 1.96·std/√n; a bf16 run is tested "
        "under bf16 (what its user gets) and again in float32 (what it learned). \"bf16 − fp32 (paired)\": the per-task "
        "difference to the float32 run of equal meta-steps on the same test tasks, mean ± 1.96·std/√n (sine: MSE, "
        "positive is worse; Omniglot: accuracy points, negative is worse).\n\n"
        "Seconds per meta-step and tasks/s come from a timing phase run first, the two precisions taking turns in one "
        f"process ({meta['rounds']} rounds of {meta['timing_steps']} meta-steps each, order rotated; median over the "
        f"steps during which other processes kept at most {meta['busy_threshold']} CPUs busy); \"training seconds\" is "
        "the wall time of the row's own run in a fresh process, which contention can inflate. \"Equal wall time\" gives "
        "both precisions float32's training time at equal steps (its steps × its timed s/step), converted to meta-steps "
        "by each precision's own timed s/step. Peak memory: the process's peak resident memory above what it held "
        "before training.\n\n"
        f"{tables}\n\nTimed s/step (median, min–max, steps alone):\n\n{timing_lines}\n\n"
        f"Paired differences, tested under the run's own precision:\n\n{findings(records, reference)}\n\n"
        f"Read them for what they are: the intervals are over the test tasks of one training run per row (seed "
        f"{meta['seed']}), and leave out how much a run depends on its training seed, which can be larger than the "
        "difference between the precisions (on sine especially): rerun with other `--seed` values before reading a "
        "difference as the precision's. The timed steps are the first steps from the initialisation; a step's cost can "
        "change as training goes (backtracking's extra support passes), which the training seconds show.\n"
    )


# -- main -----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    threads = torch.get_num_threads()
    spare = max(0.25, (os.cpu_count() or 1) - threads + 0.25)  # others may use the cores this process does not
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, turns_of="precision", jobs_help="training rows at once (1: timings least disturbed)",
                      busy_threshold=spare, busy_help="timing: CPUs other processes may keep busy for a step to count "
                      f"as run alone (default: the CPUs this process's {threads} thread(s) leave free, + 0.25: {spare})",
                      max_wait=10.0, max_load=spare + 0.5)
    args = parser.parse_args(argv)
    steps_of, meta = start_run(parser, args, "benchmarks.bf16_learning", argv)
    saved_env = _spawn_env()
    with omniglot_root(parser, args) as root:
        # 1. Timing by turns: the two precisions alternate in one process per problem.
        print(f"\n== timing: {args.rounds} rounds of {args.timing_steps} meta-steps per precision, taking turns",
              flush=True)
        variants = {p: (METHOD, {"precision": p}) for p in PRECISIONS}
        timing_rows = [dict(problem=p, methods=[METHOD], variants=variants, rounds=args.rounds, steps=args.timing_steps,
                            seed=args.seed, root=root, busy_threshold=args.busy_threshold, max_wait=args.max_wait,
                            label=f"timing {p}") for p in args.problems]
        timing = time_problems(timing_rows)
        write = SectionWriter("bf16_learning", timing, meta, "precision", section, not args.no_write)

        def row(p: str, precision: str, steps: int, pass_: str, budget: str) -> dict:
            return dict(problem=p, precision=precision, steps=steps, budget=budget, seed=args.seed, root=root,
                        test_tasks=args.test_tasks, label=f"{p} {precision}, {steps} meta-steps ({budget})",
                        **{"pass": pass_})

        # 2. Equal meta-steps.
        print("\n== equal meta-steps", flush=True)
        rows = [row(p, precision, steps_of[p], "steps", f"{steps_of[p]} meta-steps")
                for p in args.problems for precision in PRECISIONS]
        write.add(run_rows(rows, run, args.jobs, on_record=write, fresh_processes=True))

        # 3. Equal wall time: float32's steps × its timed s/step, in each precision's own timed steps.
        if not args.no_equal_time:
            rows = []
            for p in args.problems:
                budget, steps = equal_time_steps(steps_of[p], {k: v["median"] for k, v in timing[p].items()})
                rows += [row(p, precision, steps[precision], "time", f"{budget:.0f} s (float32's)")
                         for precision in PRECISIONS if precision != REFERENCE]
            print("\n== equal wall time", flush=True)
            write.add(run_rows(rows, run, args.jobs, on_record=write, fresh_processes=True))
    _restore_env(saved_env)
    meta["load_end"] = load_average()
    write([])
    text = section(write.rows(), timing, meta)
    print("\n" + (text if args.no_write else "\n\n".join(text.split("\n\n")[4:])))


if __name__ == "__main__":
    main()
