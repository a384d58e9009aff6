"""MAML, Meta-SGD and Reptile side by side: the same meta-steps, the same wall-clock time, the same inner steps.

The design document compares the methods by what each learns, its inner loop and its cost ("MAML
high, Meta-SGD higher, Reptile low"). This benchmark measures those columns on two problems:

* sine regression, 5-shot (meta-batch 25);
* real Omniglot 5-way 1-shot on held-out characters (``../shared/data/omniglot/``, the characters of
  its 5 alphabets split 0.6/0.15/0.25, meta-batch 8).

Rows (``METHODS``): MAML and first-order MAML, Meta-SGD and first-order Meta-SGD, Reptile, each with
its published settings (Meta-SGD with the settings of our configs) and on the task stream its paper
trains on: MAML and Meta-SGD on tasks of the test tasks' size (a support set and a held-out query
set), Reptile on bigger training tasks without a held-out set (Omniglot: 10 drawings per class, the
paper's train-shots 10, in inner mini-batches of 10; sine: 50 points, in mini-batches of 10, as the
paper's sine code). The data module's ``train_queries`` gives Reptile those tasks where it has that
setting (checked with ``inspect.signature``; without it Reptile trains on the test tasks' size, and the
table says so). Test tasks are the same fixed tasks for every method. Beside them, 5-step MAML and
5-step Meta-SGD (second order) give the comparison at equal inner steps with 5-step Reptile.

Three measurements:

1. **Timing, by turns** (first, when the machine is quiet): per problem one fresh process builds every
   method on its own task stream, takes a few of its training batches, and runs ``--timing-steps``
   meta-steps of each method's ``Trainer.fit`` on them, the methods taking turns over ``--rounds``
   rounds (their order rotated every round), so that a change in the machine's load hits every method
   alike. A step is timed from the end of the previous one to its own end (everything Lightning does
   between steps counts); before each step the process waits (up to ``--max-wait`` s) until other
   processes keep fewer than ``--busy-threshold`` CPUs busy, and the median is over the steps that
   ran alone (``benchmarks.throughput.StepClock``). This gives the s/step and tasks/s columns. The run
   refuses to start when the 1-minute load average is above ``--max-load`` (``--allow-busy`` to run anyway).
2. **Equal meta-steps**: every row trains ``--steps`` meta-steps in a fresh process and is tested on the
   same fixed test tasks (at the method's own number of test steps; score ± 95% interval), with its
   meta-parameters (θ and α counted apart), its training seconds and peak memory above the process's start.
3. **Equal wall time**: every method of the main rows gets the training time of Meta-SGD at equal steps,
   Meta-SGD's steps × its timed s/step, converted to meta-steps by the method's own timed s/step (its
   schedules, such as Reptile's annealed ε, sized to them).

    python -m benchmarks.compare_methods                         # sine and Omniglot, all passes
    python -m benchmarks.compare_methods --problems sine         # sine only
    python -m benchmarks.compare_methods --quick --allow-busy --no-write   # a smoke run (minutes)

Writes the tables to docs/results.md (section ``compare_methods``) and the records to
benchmarks/results/compare_methods.json (not with ``--no-write``, which prints the section instead).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import os
import platform
import shlex
import statistics
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch

from benchmarks._results import write_results
from benchmarks._training import TRAINER_ARGS, fit_and_test, quiet, run_rows
from benchmarks.throughput import KEEP_HEAP, StepClock, summarize
from datamodules import OmniglotDataModule, SineDataModule
from metasgd_lightning import ConvNet4, MetaSGDLightningModule, ReptileLightningModule, SineMLP

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared/data/omniglot/images_background_small1.zip"
DEFAULT_STEPS = {"sine": 2000, "omniglot": 1000}  # meta-steps at equal steps

try:  # MAML by name where the package has it; before, the same recipe as Meta-SGD with a fixed rate.
    from metasgd_lightning import MAMLLightningModule

    def maml(alpha: float, **kwargs) -> tuple[type, dict]:
        return MAMLLightningModule, dict(inner_lr=alpha, line_search="off", **kwargs)
except ImportError:  # pragma: no cover
    def maml(alpha: float, **kwargs) -> tuple[type, dict]:
        return MetaSGDLightningModule, dict(init_lr=alpha, learn_lr=False, line_search="off", **kwargs)


@dataclass(frozen=True)
class Method:
    """One row's recipe: the module class and its arguments, the words of the "inner loop" column,
    ``optional`` module arguments passed only where the class accepts them (options still to come),
    ``data`` arguments of the data module for this method's *training* stream (passed where the data
    module accepts them), the ``group`` of rows it belongs to (``main``: equal steps and equal time;
    ``inner5``: the equal-inner-steps rows) and its order."""

    cls: type
    kwargs: dict
    inner: str
    order: str = "second order"
    optional: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    group: str = "main"


def _maml(alpha: float, inner: str, group: str = "main", first_order: bool = False, **kwargs) -> Method:
    cls, kw = maml(alpha, first_order=first_order, **kwargs)
    return Method(cls, kw, inner, "first order" if first_order else "second order", group=group)


def _metasgd(inner: str, group: str = "main", first_order: bool = False, **kwargs) -> Method:
    return Method(MetaSGDLightningModule, dict(init_lr=(0.005, 0.1), first_order=first_order, **kwargs), inner,
                  "first order" if first_order else "second order", group=group)


# Reptile's inner Adam state kept across tasks and meta-steps (the reference code's one optimiser): the
# option's name on ReptileLightningModule, passed only once the class has it.
REPTILE_PERSISTENT_STATE = {"persistent_inner_state": True}

METHODS: dict[str, dict[str, Method]] = {
    "sine": {
        "MAML": _maml(0.01, "1 SGD step of fixed α = 0.01 (10 at test)", inner_steps=1, eval_inner_steps=10),
        "first-order MAML": _maml(0.01, "1 SGD step of fixed α = 0.01 (10 at test)", first_order=True,
                                  inner_steps=1, eval_inner_steps=10),
        "Meta-SGD": _metasgd("3 steps of learned α ⊙ ∇L, backtracking (10 at test)", inner_steps=3, eval_inner_steps=10),
        "first-order Meta-SGD": _metasgd("3 steps of learned α ⊙ ∇L, backtracking (10 at test)", first_order=True,
                                         inner_steps=3, eval_inner_steps=10),
        # The paper's sine code: 50 points per task, one epoch of mini-batches of 10 (5 SGD steps), lr 0.02.
        "Reptile": Method(ReptileLightningModule, dict(inner_optimizer="sgd", inner_lr=0.02, inner_steps=5,
                                                       inner_batch_size=10, eval_inner_steps=32),
                          "5 SGD steps, lr 0.02, mini-batches of 10 (32 at test)", "first order",
                          data=dict(train_queries=45)),
        "5-step MAML": _maml(0.01, "5 SGD steps of fixed α = 0.01 (10 at test)", group="inner5", inner_steps=5,
                             eval_inner_steps=10),
        "5-step Meta-SGD": _metasgd("5 steps of learned α ⊙ ∇L, backtracking (10 at test)", group="inner5",
                                    inner_steps=5, eval_inner_steps=10),
    },
    "omniglot": {
        "MAML": _maml(0.4, "1 SGD step of fixed α = 0.4 (3 at test)", inner_steps=1, eval_inner_steps=3),
        "first-order MAML": _maml(0.4, "1 SGD step of fixed α = 0.4 (3 at test)", first_order=True, inner_steps=1,
                                  eval_inner_steps=3),
        "Meta-SGD": _metasgd("1 step of learned α ⊙ ∇L, α's meta-lr 5e-3 (3 at test, backtracking)", lr_meta_lr=5e-3,
                             inner_steps=1, eval_inner_steps=3),
        "first-order Meta-SGD": _metasgd("1 step of learned α ⊙ ∇L, α's meta-lr 5e-3 (3 at test, backtracking)",
                                         first_order=True, lr_meta_lr=5e-3, inner_steps=1, eval_inner_steps=3),
        # The paper's Omniglot settings: train-shots 10 (1 support + 9 more drawings per class), inner batches of 10.
        "Reptile": Method(ReptileLightningModule, dict(inner_optimizer="adam", inner_lr=1e-3, inner_steps=5,
                                                       inner_batch_size=10, eval_inner_steps=50, eval_inner_batch_size=5),
                          "5 Adam steps (β1 = 0), lr 1e-3, mini-batches of 10 (50 at test, batches of 5)", "first order",
                          optional=REPTILE_PERSISTENT_STATE, data=dict(train_queries=9)),
        # MAML's 5-step setting (its 20-way Omniglot: 5 steps of α = 0.1).
        "5-step MAML": _maml(0.1, "5 SGD steps of fixed α = 0.1 (10 at test)", group="inner5", inner_steps=5,
                             eval_inner_steps=10),
        "5-step Meta-SGD": _metasgd("5 steps of learned α ⊙ ∇L, α's meta-lr 5e-3 (10 at test, backtracking)",
                                    group="inner5", lr_meta_lr=5e-3, inner_steps=5, eval_inner_steps=10),
    },
}
REFERENCE = "Meta-SGD"  # equal wall time: this method's training time at equal steps
DATA = {  # the data modules' shared settings (the test tasks, and the training tasks unless a method changes them)
    "sine": dict(shots=5, queries=10, meta_batch_size=25),
    "omniglot": dict(layout="folder", fractions=(0.6, 0.15, 0.25), ways=5, shots=1, queries=1, meta_batch_size=8,
                     num_workers=0),
}


# -- building a method and its task stream ------------------------------------------------------------------------


def _accepted(cls: type, kwargs: dict) -> tuple[dict, dict]:
    """(the arguments of ``kwargs`` that ``cls`` accepts, those it does not)."""
    names = inspect.signature(cls).parameters
    return ({k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names})


def build_module(problem: str, name: str) -> tuple[L.LightningModule, dict]:
    method = METHODS[problem][name]
    optional, skipped = _accepted(method.cls, method.optional)
    if problem == "sine":
        module = method.cls(SineMLP(), task="regression", **method.kwargs, **optional)
    else:
        module = method.cls(ConvNet4(out_features=5, in_channels=1, hidden_channels=64, image_size=28,
                                     downsample="stride"), task="classification", **method.kwargs, **optional)
    return module, {"options": optional, "options_not_available": skipped}


def build_data(problem: str, name: str, steps: int, seed: int, root: str, test_tasks: int) -> tuple[L.LightningDataModule, dict]:
    """The data module of ``name``'s task stream, and what the stream is (``stream``, ``not_available``)."""
    cls = SineDataModule if problem == "sine" else OmniglotDataModule
    base = dict(DATA[problem])
    wanted = METHODS[problem][name].data
    extra, skipped = _accepted(cls, wanted)
    settings = {**base, **extra}
    batch = settings["meta_batch_size"]
    kwargs = dict(settings, train_tasks_per_epoch=batch * max(1, steps), val_tasks=batch, test_tasks=test_tasks, seed=seed)
    if problem == "omniglot":
        kwargs["root"] = root
    train_queries = settings.get("train_queries", settings["queries"])
    if problem == "sine":
        size = settings["shots"] + train_queries
        held_out = METHODS[problem][name].cls is not ReptileLightningModule
        stream = (f"{settings['shots']} + {train_queries} held-out points" if held_out else f"{size} points") + " per task"
    else:
        per_class = settings["shots"] + train_queries
        held_out = METHODS[problem][name].cls is not ReptileLightningModule
        stream = (f"{settings['ways']} ways × ({settings['shots']} + {train_queries} held-out) drawings" if held_out
                  else f"{settings['ways']} ways × {per_class} drawings, no held-out set")
    stream += f", {batch} tasks per meta-step"
    if skipped:
        stream += f" (wanted {', '.join(f'{k}={v}' for k, v in skipped.items())}: not in {cls.__name__} yet)"
    return cls(**kwargs), {"stream": stream, "tasks_per_step": batch, "data_not_available": skipped}


def meta_parameters(module: L.LightningModule) -> tuple[int, int]:
    theta = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    lrs = getattr(module.meta_learner, "lrs", None)
    return theta, sum(p.numel() for p in lrs.parameters() if p.requires_grad) if lrs is not None else 0


# -- 1. timing by turns -----------------------------------------------------------------------------------------------


class _StepTimer(L.Callback):
    """Times each step from the end of the previous one to its own end; the first step warms up (untimed)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock, self.samples = clock, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx > 0:
            self.samples.append(self.clock.stop())
        self.clock.start()


def time_turns(row: dict) -> dict:
    """Every method of ``row["methods"]`` on ``row["problem"]``: ``row["rounds"]`` turns of ``row["steps"]`` timed
    meta-steps each (after one warm-up step per turn), in this one process; the samples per method.

    ``row["variants"]`` (optional) names the rows to time instead: ``{label: (method, Trainer arguments)}``, e.g.
    one method under two precisions (``benchmarks.bf16_learning``); the result is keyed by those labels."""
    quiet()
    torch.manual_seed(row["seed"])
    problem = row["problem"]
    variants = row.get("variants") or {name: (name, {}) for name in row["methods"]}
    names = list(variants)
    # With max_wait 0 it waits for nothing but still measures how busy the other processes kept the CPUs.
    clock = StepClock(SimpleNamespace(device=torch.device("cpu"), no_wait=False,
                                      busy_threshold=row["busy_threshold"], max_wait=row["max_wait"]))
    setups = {}
    for name in names:
        L.seed_everything(row["seed"], verbose=False)
        module, _ = build_module(problem, variants[name][0])
        data, info = build_data(problem, variants[name][0], row["steps"] + 1, row["seed"], row["root"], test_tasks=1)
        data.setup("fit")
        batches = [batch for _, batch in zip(range(row["steps"] + 1), data.train_dataloader())]
        setups[name] = (module, batches, info)
    samples: dict[str, list] = {name: [] for name in names}
    for r in range(row["rounds"]):
        order = names[r % len(names):] + names[: r % len(names)]  # rotated: no method always first or last
        for name in order:
            module, batches, _ = setups[name]
            timer = _StepTimer(clock)
            trainer = L.Trainer(max_steps=len(batches), limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
                                **{**TRAINER_ARGS, **variants[name][1]})
            trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
            samples[name] += timer.samples
        print(f"  timing {problem}, round {r + 1}/{row['rounds']}: " + ", ".join(
            f"{name} {statistics.median(t for t, _ in samples[name][-row['steps']:]):.3f}" for name in names)
            + " s/step", flush=True)
    out = {}
    for name in names:
        st = summarize(samples[name], row["busy_threshold"])
        out[name] = dict(st, tasks_per_step=setups[name][2]["tasks_per_step"])
    return dict(problem=problem, timing=out, summary=f"timing {problem}: " + ", ".join(
        f"{n} {out[n]['median']:.3f} s/step ({out[n]['clean']}/{out[n]['total']} alone)" for n in names))


# -- 2. and 3. training and testing -------------------------------------------------------------------------------------


def time_problems(timing_rows: list[dict]) -> dict[str, dict]:
    """:func:`time_turns` for each problem's row, each in a fresh process; {problem: {name: timing}}. Exits if one fails."""
    timing = {r["problem"]: r["timing"] for r in run_rows(timing_rows, time_turns, fresh_processes=True)
              if "error" not in r}
    for r in timing_rows:
        if r["problem"] not in timing:
            sys.exit(f"the timing of {r['problem']} failed (see above)")
    return timing


def with_timing(records: list[dict], timing: dict[str, dict], key: str) -> list[dict]:
    """Each record with its timed s/step and tasks/s, from ``timing[problem][record[key]]`` where it was timed."""
    for r in records:
        t = timing[r["problem"]].get(r[key])
        if t is not None:
            r["timed_seconds_per_step"] = t["median"]
            r["tasks_per_second"] = r["tasks_per_step"] / t["median"]
    return records


def run(row: dict) -> dict:
    """Train and test one method on one problem (in a fresh worker process)."""
    quiet()
    L.seed_everything(row["seed"], verbose=False)
    problem, name = row["problem"], row["method"]
    method = METHODS[problem][name]
    module, options = build_module(problem, name)
    theta, alpha = meta_parameters(module)
    data, info = build_data(problem, name, row["steps"], row["seed"], row["root"], row["test_tasks"])
    result = fit_and_test(module, data, row["steps"], [module.eval_inner_steps])
    record = {k: v for k, v in row.items() if k not in ("root", "label")}
    kept = "; inner Adam state kept across tasks and meta-steps" if options["options"].get("persistent_inner_state") else ""
    record.update(inner_loop=method.inner + kept, order=method.order, group=method.group, theta=theta, alpha=alpha,
                  seconds=result["seconds"], steps_done=result["steps_done"], peak_memory_mib=result.get("peak_memory_mib"),
                  eval_inner_steps=module.eval_inner_steps, stream=info["stream"], tasks_per_step=info["tasks_per_step"],
                  options=dict(options["options"]),
                  not_available={**info["data_not_available"], **options["options_not_available"]})
    record["fit_seconds_per_step"] = result["seconds"] / max(1, result["steps_done"])
    if "diverged" in result:
        record["diverged"] = result["diverged"]
    else:
        scores = result["eval"][module.eval_inner_steps]
        if "diverged" in scores:
            record["diverged"] = scores["diverged"]
        else:
            scale = 1 if problem == "sine" else 100
            record.update(score=scale * scores["mean"], ci95=scale * scores["ci95"])
    unit = "MSE" if problem == "sine" else "accuracy"
    record["summary"] = f"{row['label']}: " + (record.get("diverged") or (
        f"test {unit} {record['score']:.3f} ± {record['ci95']:.3f}, {record['steps_done']} steps in "
        f"{record['seconds']:.0f} s, {record['peak_memory_mib'] or 0:.0f} MiB"))
    return record


# -- the tables -----------------------------------------------------------------------------------------------------------


def table(records: list[dict]) -> str:
    lines = ["| problem | budget | method | training tasks | learned (meta-parameters) | inner loop | test score ± 95% CI "
             "| meta-steps | training seconds | s / meta-step (turns) | tasks / s | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        learned = f"θ {r['theta']:,}" + (f" + α {r['alpha']:,}" if r["alpha"] else "")
        if "diverged" in r:
            score = f"diverged ({r['diverged']})"
        elif r["problem"] == "sine":
            score = f"MSE {r['score']:.3f} ± {r['ci95']:.3f}"
        else:
            score = f"{r['score']:.2f}% ± {r['ci95']:.2f}%"
        per_step, rate, memory = cost_cells(r)
        lines.append(f"| {r['problem']} | {r['budget']} | {r['method']} | {r['stream']} | {learned} "
                     f"| {r['inner_loop']}; {r['order']} | {score} | {r['steps_done']} | {r['seconds']:.0f} | {per_step} "
                     f"| {rate} | {memory} |")
    return "\n".join(lines)


def cost_cells(record: dict) -> tuple[str, str, str]:
    """A row's s / meta-step (timed by turns, else its training's), tasks / s and peak memory cells."""
    timed = record.get("timed_seconds_per_step")
    per_step = f"{timed:.3f}" if timed else f"({record['fit_seconds_per_step']:.3f} in training)"
    rate = f"{record['tasks_per_step'] / timed:.1f}" if timed else "–"
    memory = f"+{record['peak_memory_mib']:.0f} MiB" if record.get("peak_memory_mib") is not None else "–"
    return per_step, rate, memory


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def section(records: list[dict], timing: dict, meta: dict) -> str:
    groups = [("Equal meta-steps", lambda r: r["group"] == "main" and r["pass"] == "steps"),
              ("Equal wall time", lambda r: r["pass"] == "time" or (r["method"] == REFERENCE and r["pass"] == "steps")),
              ("Equal inner steps (5)", lambda r: r["pass"] == "steps" and (r["group"] == "inner5" or r["method"] == "Reptile"))]
    tables = "\n\n".join(f"### {title}\n\n{table([r for r in records if keep(r)])}" for title, keep in groups
                         if any(keep(r) for r in records))
    timing_lines = "\n".join(
        f"- {problem}: " + "; ".join(f"{name} {t['median']:.3f} s ({t['min']:.3f}–{t['max']:.3f}, {t['clean']}/{t['total']} "
                                      "steps alone)" for name, t in per.items())
        for problem, per in timing.items())
    missing = sorted({f"{k}" for r in records for k in r.get("not_available", {})})
    return (
        "## MAML, Meta-SGD and Reptile: the same meta-steps, the same wall-clock time, the same inner steps\n\n"
        f"Command: `{meta['command']}`; seed {meta['seed']}; budget {meta['budget']}; {meta['test_tasks']} fixed test "
        f"tasks per problem; {meta['date']}; {meta['machine']}. Load average at the start: {meta['load']}.\n\n"
        "Problems: sine 5-shot (test tasks 5 + 10 points, meta-batch 25); Omniglot 5-way 1-shot on held-out characters "
        "of the \"background small 1\" split (0.6/0.15/0.25; test tasks 1 drawing + 1 query per class), meta-batch 8, "
        "strided 64-channel ConvNet4. Each method trains on the task stream its paper trains on (\"training tasks\"): "
        "MAML and Meta-SGD on tasks of the test tasks' size with a held-out query set; Reptile on all of a bigger task, in "
        "inner mini-batches of 10 (Omniglot: 10 drawings per class, the paper's train-shots 10; sine: 50 points, as the "
        "paper's sine code); all at the same meta-batch (the papers' own meta-batches differ: MAML 32, Reptile 5 on "
        "Omniglot, Reptile 1 on sine). Test score over the same fixed test tasks at each method's own number of test "
        "steps, mean ± 1.96·std/√n."
        + (f" Not available in this version of the package, so not used: {', '.join(missing)}." if missing else "")
        + "\n\n"
        "Seconds per meta-step and tasks/s come from a timing phase run first, in which the methods take turns "
        f"({meta['rounds']} rounds of {meta['timing_steps']} meta-steps each, on a few of each method's own training "
        "batches, the order rotated every round; median over the steps during which other processes kept fewer than "
        f"{meta['busy_threshold']} CPUs busy); \"training seconds\" is the wall time of the row's own run in a fresh "
        "process (every row in turn, one at a time), which contention can inflate. \"Equal wall time\" gives each method "
        "Meta-SGD's training time at equal steps (its steps × its timed s/step), converted to meta-steps by the method's "
        "own timed s/step. Peak memory: the process's peak resident memory above what it held before training.\n\n"
        f"{tables}\n\nTimed s/step (median, min–max, steps alone):\n\n{timing_lines}\n"
    )


# -- main -----------------------------------------------------------------------------------------------------------------


def _spawn_env() -> dict:
    """The environment of the worker processes: glibc's heap kept (as throughput.py's fresh processes)."""
    saved = {k: os.environ.get(k) for k in KEEP_HEAP}
    os.environ.update(KEEP_HEAP)
    return saved


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def add_run_arguments(parser: argparse.ArgumentParser, *, turns_of: str, jobs_help: str, busy_threshold: float,
                      busy_help: str, max_wait: float, max_load: float) -> None:
    """The options of the learning benchmarks that take turns, train rows and write a section (this one and
    ``benchmarks.bf16_learning``); ``turns_of`` names what takes turns in the timing (methods, precisions)."""
    parser.add_argument("--problems", nargs="+", choices=["sine", "omniglot"], default=["sine", "omniglot"])
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="meta-steps at equal steps, one per problem (default: sine 2000, Omniglot 1000)")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--zip", type=Path, default=SHARED_ZIP, help="images_background_small1.zip")
    parser.add_argument("--jobs", type=int, default=1, help=jobs_help)
    parser.add_argument("--no-equal-time", action="store_true", help="no equal-wall-time pass")
    parser.add_argument("--rounds", type=int, default=5, help=f"timing: turns per {turns_of}")
    parser.add_argument("--timing-steps", type=int, default=6, help="timing: timed meta-steps per turn")
    parser.add_argument("--busy-threshold", type=float, default=busy_threshold, help=busy_help)
    parser.add_argument("--max-wait", type=float, default=max_wait, help="timing: seconds to wait for quiet CPUs before a step")
    parser.add_argument("--max-load", type=float, default=max_load,
                        help=f"refuse to start above this 1-minute load average (default {max_load})")
    parser.add_argument("--allow-busy", action="store_true", help="start even above --max-load (the timings say so)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 meta-steps per problem, 20 test tasks, 2 rounds of 2 timed steps, no waiting")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/results.md")
    parser.add_argument("--seed", type=int, default=0)


def start_run(parser: argparse.ArgumentParser, args: argparse.Namespace, module: str, argv: list[str] | None
              ) -> tuple[dict[str, int], dict]:
    """Settle ``--quick`` and ``--steps``, quiet the libraries, refuse a busy machine (unless ``--allow-busy``);
    the meta-steps of each problem and the run's record (command line, load, machine, date, budget)."""
    if args.quick:
        args.steps = args.steps or [5] * len(args.problems)
        args.test_tasks, args.rounds, args.timing_steps, args.max_wait = min(args.test_tasks, 20), 2, 2, 0.0
    if args.steps and len(args.steps) != len(args.problems):
        parser.error(f"--steps needs one value per problem {args.problems}; got {args.steps}")
    steps_of = dict(zip(args.problems, args.steps or [DEFAULT_STEPS[p] for p in args.problems]))
    quiet()
    command = f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    load = os.getloadavg()
    print(f"load average: {load_average()}", flush=True)
    if load[0] > args.max_load:
        message = (f"the machine is busy (1-minute load {load[0]:.2f} > --max-load {args.max_load}): timings and training "
                   "seconds would measure the other work too")
        if not args.allow_busy:
            parser.error(message + "; wait for a quiet machine or pass --allow-busy")
        print("WARNING: " + message + " (--allow-busy)", flush=True)
    meta = dict(command=command, seed=args.seed, test_tasks=args.test_tasks, rounds=args.rounds,
                timing_steps=args.timing_steps, busy_threshold=args.busy_threshold, load=load_average(),
                machine=machine(), date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                budget="; ".join(f"{p} {steps_of[p]} meta-steps" for p in args.problems))
    return steps_of, meta


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" (1, 5, 15 min) on {os.cpu_count()} CPUs"


@contextlib.contextmanager
def omniglot_root(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[str]:
    """The Omniglot folder of ``--zip``, unpacked into a temporary folder for the run ("" without Omniglot)."""
    with tempfile.TemporaryDirectory(prefix="omniglot_") as tmp:
        if "omniglot" not in args.problems:
            yield ""
            return
        if not args.zip.is_file():
            parser.error(f"--zip: no file at {args.zip}; pass the Omniglot zip")
        with zipfile.ZipFile(args.zip) as archive:
            archive.extractall(tmp)
        yield str(Path(tmp) / args.zip.stem)


class SectionWriter:
    """Writes the benchmark's section of docs/results.md after every finished row (unless ``--no-write``): the rows
    so far with the timing's s/step (``with_timing`` by ``key``), and the run's record."""

    def __init__(self, name: str, timing: dict, meta: dict, key: str, section: Callable, write: bool) -> None:
        self.name, self.timing, self.meta, self.key, self.section, self.write_file = name, timing, meta, key, section, write
        self.done: list[dict] = []

    def rows(self, records: list[dict] = ()) -> list[dict]:
        """The rows kept so far and ``records``, with their timed s/step."""
        return with_timing([*self.done, *records], self.timing, self.key)

    def __call__(self, records: list[dict]) -> None:
        rows_so_far = self.rows(records)
        if self.write_file and rows_so_far:
            write_results(self.name, [{k: v for k, v in r.items() if k != "summary"} for r in rows_so_far]
                          + [{"timing": self.timing, **self.meta}], self.section(rows_so_far, self.timing, self.meta))

    def add(self, records: list[dict]) -> None:
        """Keep the rows that ran (a row that failed says so in the log and stays out of the table)."""
        self.done += [r for r in records if "error" not in r]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, turns_of="method", jobs_help="accuracy rows at once (peak memory is cleanest with 1)",
                      busy_threshold=0.25, busy_help="timing: CPUs other processes may keep busy for a step to count "
                      "as run alone", max_wait=20.0, max_load=0.5)
    parser.add_argument("--methods", nargs="+", default=None, help="only these rows (names of METHODS)")
    parser.add_argument("--no-inner5", action="store_true", help="no equal-inner-steps rows")
    args = parser.parse_args(argv)
    steps_of, meta = start_run(parser, args, "benchmarks.compare_methods", argv)
    for problem in args.problems:
        for name, method in METHODS[problem].items():
            _, skipped = _accepted(SineDataModule if problem == "sine" else OmniglotDataModule, method.data)
            _, skipped_options = _accepted(method.cls, method.optional)
            if skipped or skipped_options:
                print(f"note: {problem} {name}: not available yet, so not used: "
                      + ", ".join(f"{k}={v}" for k, v in {**skipped, **skipped_options}.items()), flush=True)
    names_of = {p: [n for n, m in METHODS[p].items() if (args.methods is None or n in args.methods)
                    and not (args.no_inner5 and m.group == "inner5")] for p in args.problems}
    saved_env = _spawn_env()
    with omniglot_root(parser, args) as root:
        # 1. Timing by turns, while the machine is (as) quiet (as it gets).
        print(f"\n== timing: {args.rounds} rounds of {args.timing_steps} meta-steps per method, methods taking turns",
              flush=True)
        timing_rows = [dict(problem=p, methods=names_of[p], rounds=args.rounds, steps=args.timing_steps, seed=args.seed,
                            root=root, busy_threshold=args.busy_threshold, max_wait=args.max_wait, label=f"timing {p}")
                       for p in args.problems]
        timing = time_problems(timing_rows)
        write = SectionWriter("compare_methods", timing, meta, "method", section, not args.no_write)

        # 2. Equal meta-steps.
        print("\n== equal meta-steps", flush=True)
        rows = [dict(problem=p, method=name, steps=steps_of[p], budget=f"{steps_of[p]} meta-steps", **{"pass": "steps"},
                     seed=args.seed, root=root, test_tasks=args.test_tasks, label=f"{p} {name}, {steps_of[p]} meta-steps")
                for p in args.problems for name in names_of[p]]
        write.add(run_rows(rows, run, args.jobs, on_record=write, fresh_processes=True))

        # 3. Equal wall time: the reference's steps × its timed s/step, in each method's own timed steps.
        if not args.no_equal_time:
            equal_time = []
            for p in args.problems:
                if REFERENCE not in timing[p]:
                    continue
                budget = steps_of[p] * timing[p][REFERENCE]["median"]
                for name in names_of[p]:
                    if name == REFERENCE or METHODS[p][name].group != "main":
                        continue
                    steps = max(1, round(budget / timing[p][name]["median"]))
                    equal_time.append(dict(problem=p, method=name, steps=steps, seed=args.seed, root=root, **{"pass": "time"},
                                           test_tasks=args.test_tasks, budget=f"{budget:.0f} s (Meta-SGD's)",
                                           label=f"{p} {name}, {steps} meta-steps (≈ {budget:.0f} s)"))
            print("\n== equal wall time", flush=True)
            write.add(run_rows(equal_time, run, args.jobs, on_record=write, fresh_processes=True))
    _restore_env(saved_env)
    text = section(write.rows(), timing, meta)
    print("\n" + (text if args.no_write else "\n\n".join(text.split("\n\n")[3:])))


if __name__ == "__main__":
    main()
