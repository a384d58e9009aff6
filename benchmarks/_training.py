"""What the learning benchmarks share: train a module for a budget, test it, report rows as they run.

A row trains one configuration with ``Trainer.fit`` for a number of meta-steps, then scores it on the
fixed test tasks at one or more numbers of inner steps. A run that diverges (``InnerLoopDivergedError``
in training or at test) is a result too: the row records where, instead of stopping the benchmark.
Rows can run in parallel worker processes (``--jobs``), each with its share of the CPU threads.
"""

from __future__ import annotations

import logging
import os
import resource
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import torch

from metasgd_lightning import InnerLoopDivergedError
from metasgd_lightning.commands._quiet import silence_lightning_noise

REPO = Path(__file__).resolve().parents[1]

TRAINER_ARGS = dict(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)


def quiet() -> None:
    """No Lightning info lines or third-party warnings between the benchmark's own lines."""
    silence_lightning_noise()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def fit_and_test(module: L.LightningModule, data: L.LightningDataModule, steps: int,
                 eval_steps: Sequence[int], max_time: float | None = None, validate: bool = False,
                 trainer_args: dict | None = None) -> dict:
    """Train ``module`` for ``steps`` meta-steps (or ``max_time`` seconds), then test at each of ``eval_steps``;
    every Trainer takes ``TRAINER_ARGS`` with ``trainer_args`` over them (e.g. ``{"precision": "bf16-mixed"}``).

    Returns ``seconds`` (training wall time), ``steps_done``, ``peak_memory_mib`` (the process's
    peak resident memory above what it held before training: meaningful in a fresh process), with ``validate`` the validation score
    ``val`` (at the module's ``eval_inner_steps``: the one that may pick a variant, never the test
    score) and, per number of evaluation steps, ``{"mean", "ci95", "values"}`` of the module's last
    metric (MSE or accuracy) on the test tasks; or ``diverged`` with the error message.
    """
    args = {**TRAINER_ARGS, **(trainer_args or {})}
    record: dict = {}
    rss_before = _rss_kib()
    start = time.perf_counter()
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, max_time=None if max_time is None else {"seconds": max_time},
                        **args)
    try:
        trainer.fit(module, data)
    except InnerLoopDivergedError as error:
        record.update(seconds=round(time.perf_counter() - start, 1), steps_done=trainer.global_step,
                      diverged=first_sentence(error))
        return record
    record.update(seconds=round(time.perf_counter() - start, 1), steps_done=trainer.global_step,
                  peak_memory_mib=round(max(0, _peak_rss_kib() - rss_before) / 1024, 1))
    metric = module.metric_names[-1]  # "mse" or "acc"
    if validate:
        try:
            scores = L.Trainer(**args).validate(module, data, verbose=False)[0]
            record["val"] = {"mean": scores[f"val/{metric}"], "ci95": scores[f"val/{metric}_ci95"]}
        except InnerLoopDivergedError as error:
            record["val"] = {"diverged": first_sentence(error)}
    record["eval"] = {}
    for n in eval_steps:
        module.eval_inner_steps = n
        try:
            L.Trainer(**args).test(module, data, verbose=False)
        except InnerLoopDivergedError as error:
            record["eval"][n] = {"diverged": first_sentence(error)}
            continue
        result = module.test_results[metric]
        record["eval"][n] = {"mean": float(result["mean"]), "ci95": float(result["ci95"]),
                             "values": result["values"].tolist()}
    return record


def _rss_kib() -> int:
    """This process's resident memory now, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _peak_rss_kib() -> int:
    """This process's peak resident memory so far, in KiB: run a row in a fresh process to measure it alone."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def first_sentence(error: Exception) -> str:
    """``InnerLoopDivergedError``'s where and what (e.g. "training (global step 292): the support loss ..."), without the advice."""
    return str(error).split(". The inner loop diverged")[0]


def max_over_median(values: Sequence[float]) -> float:
    """The largest task value over the median task value: how far the worst task is from a typical one."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.max() / t.median())


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet()


def run_rows(rows: Sequence[dict], run: Callable[[dict], dict], jobs: int = 1,
             on_record: Callable[[list[dict]], None] | None = None, fresh_processes: bool = False) -> list[dict]:
    """``run(row)`` for every row, in ``jobs`` processes, printing one line as each row starts and ends.

    ``run`` must be a module-level function (it is pickled to the workers). A row that raises becomes
    a record with ``error`` (the others go on). ``on_record`` gets the finished records (in row order)
    after each row, e.g. to write a partial table that survives a stopped run. ``fresh_processes``
    runs every row in a new process (for peak-memory figures), also with ``jobs=1``. Returns the
    records in the order of ``rows``.
    """
    total, start = len(rows), time.perf_counter()
    records: list[dict | None] = [None] * total

    def finish(i: int, get: Callable[[], dict]) -> None:
        try:
            records[i] = get()
        except Exception as error:  # noqa: BLE001  (one broken row must not lose the others)
            records[i] = dict(rows[i], error=f"{type(error).__name__}: {error}",
                              summary=f"{rows[i]['label']}: failed with {type(error).__name__}: {error}")
        done = sum(r is not None for r in records)
        elapsed = time.perf_counter() - start
        print(f"[{done}/{total} done] {records[i].get('summary', '')} ({records[i].get('seconds', 0):.0f} s; "
              f"{elapsed / 60:.1f} min so far, about {elapsed / done * (total - done) / 60:.0f} min left)", flush=True)
        if on_record is not None:
            on_record([r for r in records if r is not None and "error" not in r])

    if jobs <= 1 and not fresh_processes:
        for i, row in enumerate(rows):
            print(f"[{i + 1}/{total}] {row['label']} ...", flush=True)
            finish(i, lambda row=row: run(row))  # finish() calls it at once
        return records  # type: ignore[return-value]
    # OMP_NUM_THREADS (torch's own thread count) caps each row's share, e.g. beside another benchmark.
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // jobs))
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,),
                             max_tasks_per_child=1 if fresh_processes else None) as pool:
        futures = {pool.submit(run, row): i for i, row in enumerate(rows)}
        print(f"{total} rows in {jobs} processes of {threads} thread(s): "
              + "; ".join(f"[{i + 1}] {row['label']}" for i, row in enumerate(rows)), flush=True)
        for future in as_completed(futures):
            finish(futures[future], future.result)
    return records  # type: ignore[return-value]
