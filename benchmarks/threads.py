"""What torch's default thread count costs on a shared CPU: Omniglot meta-training steps/s by threads and load.

    python -m benchmarks.threads [--steps 6] [--rounds 2] [--tasks 32]

One Meta-SGD step as in Omniglot 5-way 1-shot training (:class:`~metasgd_lightning.ConvNet4`, 64 channels,
28x28, 5 queries per class, ``--tasks`` tasks per meta-batch, one inner step; random data of the real
shapes), timed in a fresh process with torch's default intra-op threads (``torch.get_num_threads()``,
the number of cores) and with one thread; each alone and beside a busy process (a Python loop that keeps
one core busy, started by this script). Conditions take turns (``--rounds``) so that changes in the
machine's other load hit each alike. The machine's load average is recorded with each figure: on a machine
that other users share, "alone" means beside their work only. Writes the ``threads`` section of
docs/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks._results import write_results

WORKER = r"""
import json, sys, time, torch
import torch.nn.functional as F
from metasgd_lightning import ConvNet4, MetaSGD
threads, steps, tasks = (int(a) for a in sys.argv[1:4])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
meta = MetaSGD(ConvNet4(out_features=5, hidden_channels=64, image_size=28), init_lr=0.4)
optimizer = torch.optim.Adam(meta.parameters(), lr=1e-3)
batch = (torch.randn(tasks, 5, 1, 28, 28), torch.arange(5).repeat(tasks, 1),
         torch.randn(tasks, 25, 1, 28, 28), torch.arange(5).repeat_interleave(5).repeat(tasks, 1))
times = []
for i in range(steps + 1):
    start = time.perf_counter()
    loss = meta.adapt_tasks(*batch, F.cross_entropy).query_loss.mean()
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    if i:  # the first step warms up
        times.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "times": times}))
"""

BUSY = "while True: pass"


def measure(threads: int, busy: bool, steps: int, tasks: int) -> dict:
    """One fresh process's median step time, with ``threads`` intra-op threads (0: torch's default)."""
    spinner = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        time.sleep(0.2 if busy else 0)
        load = os.getloadavg()[0]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        out = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(steps), str(tasks)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    record = json.loads(out.splitlines()[-1])
    median = statistics.median(record["times"])
    return {"threads": record["threads"], "default": threads == 0, "busy": busy, "step_s": median,
            "tasks_per_s": tasks / median, "load_before": load}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=32)
    args = parser.parse_args(argv)
    conditions = [(threads, busy) for busy in (False, True) for threads in (0, 1)]
    records = []
    for round_ in range(args.rounds):
        for threads, busy in conditions:
            record = measure(threads, busy, args.steps, args.tasks)
            records.append({**record, "round": round_})
            print(json.dumps(records[-1]), flush=True)
    rows = []
    for threads, busy in conditions:
        mine = [r for r in records if r["default"] == (threads == 0) and r["busy"] == busy]
        label = f"default ({mine[0]['threads']})" if threads == 0 else "1"
        rates = ", ".join(f"{r['tasks_per_s']:.1f}" for r in mine)
        loads = ", ".join(f"{r['load_before']:.1f}" for r in mine)
        rows.append(f"| {label} | {'yes' if busy else 'no'} | {statistics.median(r['tasks_per_s'] for r in mine):.1f} "
                    f"| {rates} | {loads} |")
    command = "python -m benchmarks.threads " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join([
        "## Intra-op threads on a shared CPU",
        "",
        f"`{command.strip()}` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{datetime.date.today()}. Omniglot 5-way 1-shot Meta-SGD steps (ConvNet4, 64 channels, {args.tasks} tasks "
        "per step), median of each process's steps; each condition in a fresh process, in turns. \"Busy\": beside "
        "a process this script starts that keeps one core busy. The load average (1 min) before each run says how "
        "busy the machine was besides: other people's work counts too.",
        "",
        "| intra-op threads | busy process | tasks/s (median) | tasks/s per round | load average |",
        "|---|---|---|---|---|",
        *rows,
    ])
    write_results("threads", records, section)
    print(section)


if __name__ == "__main__":
    main()
