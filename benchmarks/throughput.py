"""Meta-training throughput: learn2learn vs our core vs our LightningModule, on identical batches.

The Omniglot setting: :class:`~metasgd_lightning.models.ConvNet4` (64 channels, 28x28 grey images,
max-pooling blocks), 5-way 1-shot with 15 queries per class, 32 tasks per meta-batch, one inner step;
random data of the real shapes. Every implementation starts from the same θ (α = 0.4 everywhere)
and meets the same batches, so their first meta-losses agree (printed as a cross-check). Timed, per
optimiser step:

1. ``l2l``: learn2learn's ``MetaSGD``: ``clone()``, ``adapt()``, a backward per task, an Adam step
   (learn2learn's own examples);
2. ``core``: our :class:`~metasgd_lightning.MetaSGD` without Lightning: ``adapt_tasks``, one backward
   of the mean query loss, an Adam step;
3. ``lightning``: :class:`~metasgd_lightning.MetaSGDLightningModule` under ``Trainer.fit`` on a
   DataLoader over the same pre-generated batches; a callback times each step from the end of the
   previous one (``on_train_batch_end``) to its own end, so all that Lightning does between two
   steps (fetching the batch, hooks, logging) counts.

Each implementation runs in a fresh process, as it would for a user: in one shared process the C
heap (glibc malloc's adaptive thresholds) that one implementation leaves behind changes how many
page faults the next one takes, by up to 20% on CPU. Processes take turns (``--rounds``) so that a
change in the machine's load hits every implementation alike. A process runs one warm-up step (not
timed; it gives the first meta-loss) and then its timed steps; a table shows the median. Peak
memory: on CPU the process's peak resident set size (``VmHWM``) and its growth over the resident
size before the first step; on CUDA ``torch.cuda.max_memory_allocated``.

The CPU may be shared with other work. Before each timed step a process waits (up to ``--max-wait``
seconds) until other processes keep fewer than ``--busy-threshold`` CPUs busy, measures how busy
they kept the CPUs during the step, and the median is over the steps that ran alone ("alone"
column: such steps / all steps; if none did, over all of them). Two OpenMP threads that share two
cores with another busy process can make a step ten times slower.

    python benchmarks/throughput.py                      # second and first order, real sizes
    python benchmarks/throughput.py --quick              # a smoke run: 4 tasks, 2 steps
    python benchmarks/throughput.py --profile            # where the time of one step goes
    python benchmarks/throughput.py --experiments        # candidate speed-ups, measured the same way
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from metasgd_lightning import MetaSGD  # noqa: E402
from datamodules.learn2learn_import import import_learn2learn  # noqa: E402
from metasgd_lightning._quiet import silence_lightning_noise  # noqa: E402
from metasgd_lightning.models import ConvNet4  # noqa: E402

IMPLS = ("l2l", "core", "lightning")
NAMES = {"l2l": "(1) learn2learn MetaSGD", "core": "(2) our core (no Lightning)", "lightning": "(3) our LightningModule"}
WAYS, SHOTS, QUERIES, INIT_LR, META_LR = 5, 1, 15, 0.4, 1e-3
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


# -- the set-up shared by every implementation ------------------------------------------------------


def make_batches(count: int, tasks: int, device: torch.device, seed: int = 0) -> list[Batch]:
    """``count`` meta-batches of random 5-way 1-shot tasks: ``[tasks, 5, 1, 28, 28]`` supports, 75 queries."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        sx = torch.randn(tasks, WAYS * SHOTS, 1, 28, 28, generator=g)
        qx = torch.randn(tasks, WAYS * QUERIES, 1, 28, 28, generator=g)
        sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).contiguous()
        qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous()
        batches.append(tuple(t.to(device) for t in (sx, sy, qx, qy)))
    return batches


def make_model(args) -> nn.Module:
    torch.manual_seed(args.seed)
    model = ConvNet4(out_features=WAYS, in_channels=1, hidden_channels=64, image_size=28, downsample=args.downsample)
    return model.to(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- a shared machine: wait for quiet CPUs, and flag steps that other processes slowed down -------------


def _busy_seconds() -> float:
    """CPU seconds all processes spent busy so far (``/proc/stat``: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StepClock:
    """Times a step, and measures how many CPUs other processes kept busy meanwhile (CPU only)."""

    def __init__(self, args) -> None:
        self.enabled = args.device.type == "cpu" and os.path.exists("/proc/stat") and not args.no_wait
        self.threshold, self.max_wait = args.busy_threshold, args.max_wait

    def others(self, interval: float) -> float:
        busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
        time.sleep(interval)
        return max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / (time.perf_counter() - start)

    def start(self) -> None:
        if self.enabled:
            deadline = time.perf_counter() + self.max_wait
            while self.others(0.3) > self.threshold and time.perf_counter() < deadline:
                time.sleep(0.7)
            self._busy, self._own = _busy_seconds(), _own_seconds()
        self._start = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(seconds, CPUs that other processes used meanwhile; 0 when not measured)."""
        elapsed = time.perf_counter() - self._start
        if not self.enabled:
            return elapsed, 0.0
        return elapsed, max(0.0, (_busy_seconds() - self._busy) - (_own_seconds() - self._own)) / elapsed


def summarize(samples: list[list[float]], threshold: float) -> dict[str, float]:
    """Median seconds per step over the steps that ran alone (over all steps if none did)."""
    clean = [t for t, others in samples if others <= threshold]
    chosen = clean or [t for t, _ in samples]
    return {"median": statistics.median(chosen), "min": min(chosen), "max": max(chosen),
            "clean": len(clean), "total": len(samples)}


# -- the implementations: each gives step(batch) -> meta-loss ---------------------------------------------


def l2l_step_fn(model: nn.Module, first_order: bool, args) -> Callable[[Batch], float]:
    l2l = import_learn2learn()
    meta = l2l.algorithms.MetaSGD(copy.deepcopy(model), lr=INIT_LR, first_order=first_order)
    optimizer = torch.optim.Adam(meta.parameters(), lr=META_LR)

    def step(batch: Batch) -> float:
        sx, sy, qx, qy = batch
        tasks = len(sx)
        optimizer.zero_grad()
        total = 0.0
        for t in range(tasks):  # learn2learn's examples: clone, adapt, backward per task, then average
            learner = meta.clone()
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
            loss = F.cross_entropy(learner(qx[t]), qy[t])
            loss.backward()
            total += loss.detach()
        for p in meta.parameters():
            p.grad.mul_(1.0 / tasks)
        optimizer.step()
        return float(total) / tasks

    return step


def core_step_fn(model: nn.Module, first_order: bool, args) -> Callable[[Batch], float]:
    meta = MetaSGD(copy.deepcopy(model), init_lr=INIT_LR, first_order=first_order)
    optimizer = torch.optim.Adam(meta.parameters(), lr=META_LR)

    def step(batch: Batch) -> float:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            result = meta.adapt_tasks(*batch, F.cross_entropy, vectorize=args.vectorize)
            result.raise_if_not_finite()
            loss = result.query_loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def chunked_backward_step_fn(model: nn.Module, first_order: bool, args, chunk: int) -> Callable[[Batch], float]:
    """Our core, backpropagating the query losses / T of every ``chunk`` tasks as soon as they are known
    (the module's ``tasks_per_backward``; with 1 task, learn2learn's memory profile)."""
    meta = MetaSGD(copy.deepcopy(model), init_lr=INIT_LR, first_order=first_order)
    optimizer = torch.optim.Adam(meta.parameters(), lr=META_LR)

    def step(batch: Batch) -> float:
        tasks, total = len(batch[0]), 0.0
        optimizer.zero_grad()
        for start in range(0, tasks, chunk):
            with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
                result = meta.adapt_tasks(*(x[start : start + chunk] for x in batch), F.cross_entropy,
                                          vectorize=args.vectorize)
                result.raise_if_not_finite()
                loss = result.query_loss.sum() / tasks
            loss.backward()
            total += float(result.query_loss.detach().sum())
        optimizer.step()
        return total / tasks

    return step


def run_lightning(model: nn.Module, first_order: bool, batches: list[Batch], steps: int, args) -> tuple[list, list[float]]:
    """``Trainer.fit`` for one warm-up step and ``steps`` timed ones; (step samples, meta-losses)."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from metasgd_lightning import MetaSGDLightningModule

    class Batches(Dataset):
        def __len__(self) -> int:
            return steps + 1

        def __getitem__(self, i: int) -> Batch:
            return batches[i % len(batches)]

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.clock = StepClock(args)
            self.samples: list[tuple[float, float]] = []
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(args.device)
            if batch_idx > 0:  # step 0 warms up
                self.samples.append(self.clock.stop())
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            if batch_idx < steps:
                self.clock.start()

    module = MetaSGDLightningModule(copy.deepcopy(model), task="classification", init_lr=INIT_LR,
                                    first_order=first_order, vectorize=args.vectorize,
                                    optimizer=functools.partial(torch.optim.Adam, lr=META_LR))
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device.type == "cuda" else "cpu", devices=1, max_steps=steps + 1,
        precision="bf16-mixed" if args.bf16 else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(module, DataLoader(Batches(), batch_size=None, shuffle=False))
    return timer.samples, timer.losses


# -- candidate speed-ups (--experiments) ----------------------------------------------------------------------


VARIANTS: dict[str, dict] = {
    "l2l (as today)": dict(impl="l2l"),
    "core (as today)": dict(impl="core"),
    "core, backward every task": dict(impl="core", chunk=1),
    "core, backward every 8 tasks": dict(impl="core", chunk=8),
    "core + channels_last": dict(impl="core", channels_last=True),
    "core, 1 thread": dict(impl="core", threads=1),
    "core vmap": dict(impl="core", vectorize="vmap"),
    "core loop": dict(impl="core", vectorize="loop"),
    "l2l, glibc heap kept": dict(impl="l2l", env=KEEP_HEAP),
    "core, glibc heap kept": dict(impl="core", env=KEEP_HEAP),
    "core + bf16 autocast": dict(impl="core", bf16=True),
    "core, backward every task + bf16": dict(impl="core", chunk=1, bf16=True),
}


def build_step(name: str, first_order: bool, args) -> Callable[[Batch], float]:
    """The step function of an implementation (``l2l``, ``core``) or of a variant of ``VARIANTS``."""
    options = {"impl": name, **VARIANTS.get(name, {})}
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    model = make_model(args)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    sub = argparse.Namespace(**{**vars(args), "bf16": options.get("bf16", args.bf16),
                                "vectorize": options.get("vectorize", args.vectorize)})
    if options.get("chunk"):
        return chunked_backward_step_fn(model, first_order, sub, options["chunk"])
    return (l2l_step_fn if options["impl"] == "l2l" else core_step_fn)(model, first_order, sub)


# -- one process per implementation and round -------------------------------------------------------------------


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def memory_now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mib("VmRSS")


def memory_peak(device: torch.device) -> float:
    """Peak GPU memory, or this process's peak resident set size. Not ``ru_maxrss``: Linux carries that
    over from the parent across fork and exec, so a child of a big parent would report the parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def worker(name: str, first_order: bool, args) -> dict:
    """Warm-up step, then ``args.steps`` timed steps of ``name``, in this (fresh) process."""
    batches = make_batches(4, args.tasks, args.device, args.seed)
    before = memory_now(args.device)
    if name == "lightning":
        samples, losses = run_lightning(make_model(args), first_order, batches, args.steps, args)
        first_loss = losses[0]
    else:
        step = build_step(name, first_order, args)
        first_loss = step(batches[0])
        clock, samples = StepClock(args), []
        for i in range(args.steps):
            sync(args.device)
            clock.start()
            step(batches[(i + 1) % len(batches)])
            sync(args.device)
            samples.append(clock.stop())
    return {"samples": samples, "first_loss": first_loss, "before_mib": before, "peak_mib": memory_peak(args.device)}


def profile_worker(name: str, first_order: bool, args) -> None:
    """torch.profiler over one step of ``name`` after a warm-up step, in this process."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    batches = make_batches(2, args.tasks, args.device, args.seed)
    step = build_step(name, first_order, args)
    step(batches[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    clock = StepClock(args)
    clock.start()
    with torch_profile(activities=activities) as prof:
        step(batches[1])
        sync(args.device)
    wall, others = clock.stop()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) / 1e6
    groups = {
        "convolution (forward, backward)": ("conv",),
        "batch norm statistics (var_mean, rsqrt)": ("var_mean", "rsqrt", "batch_norm"),
        "max pooling (forward, backward)": ("max_pool",),
        "relu (forward, backward)": ("relu", "threshold", "clamp_min"),
        "linear layer (mm, addmm)": ("aten::mm", "aten::addmm"),
        "element-wise mul/add/sub/div/neg/sum": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg",
                                                 "aten::sum"),
    }
    shares = {group: 0.0 for group in groups}
    for event in averages:
        for group, keys in groups.items():
            if any(key in event.key for key in keys):
                shares[group] += event.self_cpu_time_total / 1e6
                break
    label = f"{name}, {'first' if first_order else 'second'} order"
    print(f"\n== profile: {label}: {wall:.3f} s wall with the profiler on; aten ops' self CPU time {total:.3f} s; "
          f"other processes kept {others:.2f} CPUs busy meanwhile")
    for group, seconds in shares.items():
        print(f"   {group:42s} {seconds:7.3f} s  {100 * seconds / total:5.1f}%")
    rest = total - sum(shares.values())
    print(f"   {'other aten ops':42s} {rest:7.3f} s  {100 * rest / total:5.1f}%")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=44))


def _forwarded(args) -> list[str]:
    out = ["--device", str(args.device), "--tasks", str(args.tasks), "--downsample", args.downsample,
           "--vectorize", args.vectorize, "--seed", str(args.seed), "--busy-threshold", str(args.busy_threshold),
           "--max-wait", str(args.max_wait), "--profile-rows", str(args.profile_rows)]
    for flag in ("bf16", "no_wait"):
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def spawn(name: str, first_order: bool, steps: int, args, profile: bool = False) -> dict | None:
    """Run ``worker`` (or ``profile_worker``) for ``name`` in a fresh Python process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **VARIANTS.get(name, {}).get("env", {})}
    command = [sys.executable, str(Path(__file__).resolve()), "--profile-one" if profile else "--worker", name,
               "--order", "first" if first_order else "second", "--steps", str(steps), *_forwarded(args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    if profile:
        print(proc.stdout, end="", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_turns(names: list[str], first_order: bool, args) -> dict[str, dict]:
    """Every name runs ``args.steps`` timed steps, in ``args.rounds`` fresh processes taken by turns."""
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
    results = {name: {"samples": [], "first_loss": None, "before_mib": None, "peak_mib": 0.0} for name in names}
    for r, steps in enumerate(per_round):
        for name in names:
            out = spawn(name, first_order, steps, args)
            res = results[name]
            res["samples"] += out["samples"]
            res["first_loss"] = out["first_loss"] if res["first_loss"] is None else res["first_loss"]
            res["before_mib"] = out["before_mib"] if res["before_mib"] is None else min(res["before_mib"], out["before_mib"])
            res["peak_mib"] = max(res["peak_mib"], out["peak_mib"])
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {statistics.median(t for t, _ in results[name]['samples'][-steps:]):.3f} s/step" for name in names),
            flush=True)
    return results


def _row(label: str, res: dict, args, width: int, reference: float | None = None) -> tuple[str, float]:
    st = summarize(res["samples"], args.busy_threshold)
    rate = args.tasks / st["median"]
    line = (f"  {label:{width}s} {st['median']:7.3f} ({st['min']:6.3f}-{st['max']:6.3f}) {st['clean']:>3d}/{st['total']:<2d} "
            f"{rate:8.2f}  " + (f"{reference / st['median']:6.2f}x  " if reference else "")
            + f"{res['first_loss']:15.6f}  {res['peak_mib']:8.0f} {'(+' + format(res['peak_mib'] - res['before_mib'], '.0f') + ')':>8s}")
    return line, st["median"]


def _header(width: int, first: str, versus: bool) -> str:
    return (f"  {first:{width}s} {'s/step':>7s} {'(min-max)':>15s} {'alone':>6s} {'tasks/s':>8s}  "
            + (f"{'vs l2l':>7s}  " if versus else "") + f"{'first meta-loss':>15s}  {'peak MiB':>8s} {'(+start)':>8s}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def orders(args) -> list[bool]:
    return [True] if args.first_order_only else [False] if args.second_order_only else [False, True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation (after warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per implementation, taken by turns")
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch")
    parser.add_argument("--first-order-only", action="store_true")
    parser.add_argument("--second-order-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 tasks, 2 steps, 1 round")
    parser.add_argument("--downsample", choices=("maxpool", "stride"), default="maxpool")
    parser.add_argument("--vectorize", choices=("auto", "loop", "vmap"), default="auto",
                        help="our core's and module's inner loop (auto: vmap on CUDA, loop on CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for our core and module (not l2l)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every process")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other processes to leave the CPUs")
    parser.add_argument("--busy-threshold", type=float, default=0.15,
                        help="CPUs other processes may keep busy for a step to count as run alone")
    parser.add_argument("--max-wait", type=float, default=90.0, help="seconds to wait for quiet CPUs before a step")
    parser.add_argument("--profile", action="store_true", help="profile one step of l2l and of our core")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--experiments", action="store_true", help="time candidate speed-ups (VARIANTS)")
    parser.add_argument("--only", default=None,
                        help="experiments: ';'-separated variant names to run (l2l (as today) always runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile-one", help=argparse.SUPPRESS)
    parser.add_argument("--order", choices=("first", "second"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.rounds = min(args.tasks, 4), 2, 1
    args.rounds = max(1, min(args.rounds, args.steps))
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    silence_lightning_noise()
    import warnings

    warnings.filterwarnings("ignore", message=".*(does not have many workers|isinstance\\(treespec|no `val_dataloader`).*")

    if args.worker or args.profile_one:
        first_order = args.order == "first"
        if args.profile_one:
            profile_worker(args.profile_one, first_order, args)
        else:
            print(json.dumps(worker(args.worker, first_order, args)))
        return

    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"Meta-SGD throughput: ConvNet4 (64 ch, 28x28x1, {args.downsample}), {WAYS}-way {SHOTS}-shot, "
          f"{QUERIES} queries/class, {args.tasks} tasks/step, 1 inner step, Adam")
    print(f"device {args.device} ({device}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, vectorize={args.vectorize}"
          f"{', bf16 autocast (ours)' if args.bf16 else ''}")
    print(f"load average at start: {load()}")

    if args.profile:
        for first_order in orders(args):
            for name in ("l2l", "core"):
                spawn(name, first_order, 1, args, profile=True)
        return

    if args.experiments:
        names = list(VARIANTS)
        if args.only:
            wanted = {name.strip() for name in args.only.split(";")}
            unknown = wanted - set(VARIANTS)
            if unknown:
                parser.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
            names = [name for name in names if name in wanted or name == "l2l (as today)"]
        for first_order in orders(args):
            order = "first" if first_order else "second"
            print(f"\nExperiments, {order} order: {args.steps} timed steps each in {args.rounds} round(s)", flush=True)
            results = run_turns(names, first_order, args)
            width = max(map(len, names))
            reference = summarize(results["l2l (as today)"]["samples"], args.busy_threshold)["median"]
            print(_header(width, "variant", True))
            for name in names:
                print(_row(name, results[name], args, width, reference)[0])
            print(f"  load average: {load()}", flush=True)
        return

    for first_order in orders(args):
        label = "first order" if first_order else "second order"
        print(f"\n{label}: {args.steps} timed steps per implementation in {args.rounds} round(s)", flush=True)
        results = run_turns(list(IMPLS), first_order, args)
        width = max(map(len, NAMES.values()))
        print(_header(width, "implementation", False))
        seconds = {}
        for impl in IMPLS:
            line, seconds[impl] = _row(NAMES[impl], results[impl], args, width)
            print(line)
        print(f"  (3)/(1) speed-up over learn2learn: {seconds['l2l'] / seconds['lightning']:.2f}x   "
              f"(2)/(1): {seconds['l2l'] / seconds['core']:.2f}x   "
              f"Lightning overhead (3)/(2) - 1: {100 * (seconds['lightning'] / seconds['core'] - 1):+.1f}% of the step time")
        print(f"  load average: {load()}", flush=True)


if __name__ == "__main__":
    main()
