"""Meta-training throughput: learn2learn vs our core vs our LightningModule, on identical batches.

The Omniglot setting: :class:`~metasgd_lightning.models.ConvNet4` (64 channels, 28x28 grey images),
5-way 1-shot with 15 queries per class, 32 tasks per meta-batch, one inner step; random data of the
real shapes. Each implementation starts from the same θ (and α = 0.4 everywhere) and meets the same
batches, so their first meta-losses agree (printed as a cross-check). Timed, per optimiser step:

1. ``l2l``: learn2learn's ``MetaSGD``: ``clone()``, ``adapt()``, a backward per task, an Adam step;
2. ``core``: our :class:`~metasgd_lightning.MetaSGD` without Lightning: ``adapt_tasks``, one backward,
   an Adam step;
3. ``lightning``: :class:`~metasgd_lightning.MetaSGDLightningModule` under ``Trainer.fit`` on a
   DataLoader over the same pre-generated batches; a callback times each step from one
   ``on_train_batch_end`` to the next, so everything Lightning does between two steps counts.

The implementations take turns (``--rounds``) so that a change in the machine's load hits them
alike; each reports the median time of its steady-state steps (the first step of every run or
``Trainer.fit`` is a warm-up and is not timed). Peak memory: on CPU the peak resident set size
(``VmHWM``) of a fresh process per implementation that runs two steps, and its growth over the
resident size before the first step; on CUDA ``torch.cuda.max_memory_allocated``.

The CPU may be shared: before each timed step the benchmark waits (up to ``--max-wait`` seconds)
until other processes keep less than ``--busy-threshold`` CPUs busy, measures how busy they kept the
CPUs during the step, and reports the median over the steps that ran alone ("alone" column: such
steps / all steps; if none ran alone, the median over all of them).

    python benchmarks/throughput.py                      # second and first order, real sizes
    python benchmarks/throughput.py --quick              # a smoke run: 4 tasks, 2 steps
    python benchmarks/throughput.py --profile            # where the time of one step goes
    python benchmarks/throughput.py --experiments        # candidate speed-ups of the core
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
from metasgd_lightning._quiet import import_learn2learn, silence_lightning_noise  # noqa: E402
from metasgd_lightning.models import ConvNet4, TaskBatchNorm2d  # noqa: E402

IMPLS = ("l2l", "core", "lightning")
WAYS, SHOTS, QUERIES, INIT_LR, META_LR = 5, 1, 15, 0.4, 1e-3
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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
    """Times a step, and measures how many CPUs other processes kept busy meanwhile.

    On a CPU that other processes share, OpenMP threads that wait for a descheduled sibling can make
    a step several times slower; such steps are reported apart. Before a step, :meth:`start` waits
    (up to ``max_wait`` seconds) until other processes use less than ``threshold`` CPUs.
    """

    def __init__(self, args) -> None:
        self.enabled = args.device.type == "cpu" and os.path.exists("/proc/stat") and not args.no_wait
        self.threshold, self.max_wait = args.busy_threshold, args.max_wait
        self.waited = 0.0

    def others(self, interval: float) -> float:
        busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
        time.sleep(interval)
        return max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / (time.perf_counter() - start)

    def start(self) -> None:
        if self.enabled:
            deadline = time.perf_counter() + self.max_wait
            began = time.perf_counter()
            while self.others(0.3) > self.threshold and time.perf_counter() < deadline:
                time.sleep(0.7)
            self.waited += time.perf_counter() - began
            self._busy, self._own = _busy_seconds(), _own_seconds()
        self._start = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(seconds, CPUs other processes used meanwhile; 0 when not measured)."""
        elapsed = time.perf_counter() - self._start
        if not self.enabled:
            return elapsed, 0.0
        others = max(0.0, (_busy_seconds() - self._busy) - (_own_seconds() - self._own)) / elapsed
        return elapsed, others


def summarize(samples: list[tuple[float, float]], threshold: float) -> dict[str, float]:
    """Median seconds per step over the steps that ran alone (all steps if none did)."""
    clean = [t for t, others in samples if others <= threshold]
    chosen = clean or [t for t, _ in samples]
    return {"median": statistics.median(chosen), "min": min(chosen), "max": max(chosen),
            "clean": len(clean), "total": len(samples)}


# -- the three implementations: each gives step(batch) -> meta-loss -----------------------------------


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


def run_lightning(model: nn.Module, first_order: bool, batches: list[Batch], steps: int, args) -> tuple[list, list[float]]:
    """``Trainer.fit`` for one warm-up step and ``steps`` timed ones; (step samples, meta-losses).

    A step is timed from the end of the previous one (``on_train_batch_end``) to its own end, so the
    loop's work between steps (fetching the batch, hooks, logging) counts.
    """
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


# -- timing ---------------------------------------------------------------------------------------------


def time_steps(step: Callable[[Batch], float], batches: list[Batch], steps: int, args, offset: int = 0) -> list:
    clock, samples = StepClock(args), []
    for i in range(steps):
        sync(args.device)
        clock.start()
        step(batches[(offset + i) % len(batches)])
        sync(args.device)
        samples.append(clock.stop())
    return samples


def benchmark_order(first_order: bool, batches: list[Batch], args) -> dict[str, dict]:
    model = make_model(args)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    first_loss: dict[str, float] = {}
    fns = {"l2l": l2l_step_fn(model, first_order, args), "core": core_step_fn(model, first_order, args)}
    for impl, step in fns.items():  # warm-up step, on the first batch: the first meta-losses must agree
        first_loss[impl] = step(batches[0])
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
    done = 0
    for r, n in enumerate(per_round):
        for impl in IMPLS:
            if impl == "lightning":
                # A fresh module each round, so its first step also meets the first batch; only steps 1.. count.
                lightning_times, losses = run_lightning(model, first_order, batches, n, args)
                times[impl] += lightning_times
                first_loss.setdefault(impl, losses[0])
            else:
                times[impl] += time_steps(fns[impl], batches, n, args, offset=1 + done)
        done += n
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{impl} {statistics.median(t for t, _ in times[impl][-n:]):.3f} s/step" for impl in IMPLS), flush=True)
    return {impl: {"times": times[impl], "first_loss": first_loss[impl]} for impl in IMPLS}


# -- memory -------------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident set size. Not ``ru_maxrss``: Linux carries that over from the
    parent across fork and exec, so a child started by a big parent would report the parent's peak."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(impl: str, first_order: bool, args, variant: bool = False) -> dict[str, float]:
    """Run two steps of ``impl`` (or of an experiment's variant); peak memory (this process is fresh on CPU)."""
    batches = make_batches(2, args.tasks, args.device, args.seed)
    model = make_model(args)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
        before = torch.cuda.memory_allocated(args.device) / 2**20
    else:
        before = rss_mib()
    if impl == "lightning":
        run_lightning(model, first_order, batches, 1, args)
    else:
        if variant:
            step = build_variant(impl, args)
        else:
            step = (l2l_step_fn if impl == "l2l" else core_step_fn)(model, first_order, args)
        for batch in batches:
            step(batch)
    if args.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(args.device) / 2**20
    else:
        peak = peak_rss_mib()
    return {"before_mib": before, "peak_mib": peak}


def measure_memory(impl: str, first_order: bool, args, probe: str = "--memory-probe") -> dict[str, float]:
    if args.device.type == "cuda":
        return memory_probe(impl, first_order, args, variant=probe == "--experiment-probe")
    command = [sys.executable, __file__, probe, impl, "--device", str(args.device),
               "--tasks", str(args.tasks), "--downsample", args.downsample, "--vectorize", args.vectorize,
               "--seed", str(args.seed)] + (["--first-order-only"] if first_order else []) + (["--bf16"] if args.bf16 else [])
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- profiling and experiments -------------------------------------------------------------------------------


def profile(batches: list[Batch], args) -> None:
    """torch.profiler over one step of learn2learn and of our core (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    model = make_model(args)
    for first_order in orders(args):
        for impl, make in (("l2l", l2l_step_fn), ("core", core_step_fn)):
            step = make(model, first_order, args)
            step(batches[0])
            sync(args.device)
            clock = StepClock(args)
            clock.start()
            with torch_profile(activities=activities) as prof:
                step(batches[1 % len(batches)])
                sync(args.device)
            wall, others = clock.stop()
            averages = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in averages) / 1e6
            groups = {"convolution (fwd, bwd)": ("conv",), "batch norm (plain ops)": ("var_mean", "rsqrt", "batch_norm"),
                      "max pooling": ("max_pool",), "relu": ("relu", "threshold", "clamp_min"),
                      "element-wise (mul/add/sub/div/neg/sum)": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::sum"),
                      "optimizer (Adam)": ("_foreach", "lerp", "addcdiv", "addcmul", "sqrt")}
            shares = {name: 0.0 for name in groups}
            for e in averages:
                for name, keys in groups.items():
                    if any(k in e.key for k in keys):
                        shares[name] += e.self_cpu_time_total / 1e6
                        break
            label = f"{impl}, {'first' if first_order else 'second'} order"
            print(f"\n== profile: {label}: wall {wall:.3f} s with the profiler on; aten ops' self CPU time {total:.3f} s; "
                  f"other processes used {others:.2f} CPUs meanwhile")
            for name, seconds in shares.items():
                print(f"   {name:42s} {seconds:7.3f} s  {100 * seconds / total:5.1f}%")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=44))


def _native_batch_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The proposed ``TaskBatchNorm2d.forward``: torch's fused kernel unless a torch.func transform is active."""
    if not torch._C._are_functorch_transforms_active():
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
    return (x - mean) * (self.weight[:, None, None] * torch.rsqrt(var + self.eps)) + self.bias[:, None, None]


VARIANTS: dict[str, dict] = {
    "l2l (TaskBatchNorm2d, as today)": dict(impl="l2l"),
    "core loop (as today)": dict(impl="core"),
    "l2l + native batch norm": dict(impl="l2l", native_bn=True),
    "core loop + native batch norm": dict(impl="core", native_bn=True),
    "core loop + native BN + channels_last": dict(impl="core", native_bn=True, channels_last=True),
    "core loop + native BN, 1 thread": dict(impl="core", native_bn=True, threads=1),
    "core loop + native BN, backward per task": dict(impl="core", native_bn=True, per_task_backward=True),
    "core vmap (grouped convolutions)": dict(impl="core", vectorize="vmap"),
    "core loop + native BN + bf16 autocast": dict(impl="core", native_bn=True, bf16=True),
}


def per_task_backward_step_fn(model: nn.Module, first_order: bool, args) -> Callable[[Batch], float]:
    """Our core, but each task's query loss / T is backpropagated at once (learn2learn's memory profile)."""
    meta = MetaSGD(copy.deepcopy(model), init_lr=INIT_LR, first_order=first_order)
    optimizer = torch.optim.Adam(meta.parameters(), lr=META_LR)

    def step(batch: Batch) -> float:
        tasks, total = len(batch[0]), 0.0
        optimizer.zero_grad()
        for t in range(tasks):
            result = meta.adapt_tasks(*(x[t : t + 1] for x in batch), F.cross_entropy, vectorize="loop")
            result.raise_if_not_finite()
            (result.query_loss.sum() / tasks).backward()
            total += float(result.query_loss.detach())
        optimizer.step()
        return total / tasks

    return step


def build_variant(name: str, args) -> Callable[[Batch], float]:
    options = {"native_bn": False, "channels_last": False, "bf16": False, "vectorize": "loop", "threads": None,
               "per_task_backward": False, **VARIANTS[name]}
    model = make_model(args)
    if options["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    sub = argparse.Namespace(**{**vars(args), "bf16": options["bf16"], "vectorize": options["vectorize"]})
    make = l2l_step_fn if options["impl"] == "l2l" else core_step_fn
    if options["per_task_backward"]:
        make = per_task_backward_step_fn
    inner = make(model, args.first_order_only, sub)
    plain_forward = TaskBatchNorm2d.forward

    def step(batch: Batch) -> float:
        TaskBatchNorm2d.forward = _native_batch_norm_forward if options["native_bn"] else plain_forward
        previous = torch.get_num_threads()
        if options["threads"]:
            torch.set_num_threads(options["threads"])
        try:
            return inner(batch)
        finally:
            torch.set_num_threads(previous)
            TaskBatchNorm2d.forward = plain_forward

    return step


def experiments(batches: list[Batch], args) -> None:
    """Candidate speed-ups of the core (and what they do to learn2learn on the same model), by turns."""
    steps = {name: build_variant(name, args) for name in VARIANTS}
    losses = {name: step(batches[0]) for name, step in steps.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        for name, step in steps.items():
            times[name] += time_steps(step, batches, 1, args, offset=1 + i)
    memory = {}
    if not args.no_memory:
        for name in VARIANTS:
            memory[name] = measure_memory(name, args.first_order_only, args, probe="--experiment-probe")
    stats = {name: summarize(samples, args.busy_threshold) for name, samples in times.items()}
    reference = stats["l2l (TaskBatchNorm2d, as today)"]["median"]
    order = "first" if args.first_order_only else "second"
    print(f"\nExperiments ({order} order, {args.tasks} tasks/step, median of {args.steps} steps taken by turns):")
    print(f"  {'variant':42s} {'s/step':>7s} {'alone':>6s} {'tasks/s':>8s} {'vs l2l':>7s}  {'first meta-loss':>15s}"
          + ("" if args.no_memory else f"  {'peak MiB':>9s} {'(+ over start)':>15s}"))
    for name in steps:
        median = stats[name]["median"]
        line = (f"  {name:42s} {median:7.3f} {stats[name]['clean']:>3d}/{stats[name]['total']:<2d} "
                f"{args.tasks / median:8.2f} {reference / median:6.2f}x  {losses[name]:15.6f}")
        if name in memory:
            m = memory[name]
            line += f"  {m['peak_mib']:9.0f} {'(+' + format(m['peak_mib'] - m['before_mib'], '.0f') + ')':>15s}"
        print(line, flush=True)


# -- main ----------------------------------------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def orders(args) -> list[bool]:
    return [True] if args.first_order_only else [False, True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation (after warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="turns the implementations take")
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch")
    parser.add_argument("--first-order-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 tasks, 2 steps, 1 round")
    parser.add_argument("--downsample", choices=("maxpool", "stride"), default="maxpool")
    parser.add_argument("--vectorize", choices=("auto", "loop", "vmap"), default="auto",
                        help="our core's and module's inner loop (auto: vmap on CUDA, loop on CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for our core and module (not l2l)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other processes to leave the CPUs")
    parser.add_argument("--busy-threshold", type=float, default=0.15,
                        help="CPUs other processes may keep busy for a step to count as run alone")
    parser.add_argument("--max-wait", type=float, default=90.0, help="seconds to wait for quiet CPUs before a step")
    parser.add_argument("--profile", action="store_true", help="profile one step of l2l and of our core")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--experiments", action="store_true", help="time candidate speed-ups of the core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-probe", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--experiment-probe", choices=list(VARIANTS), help=argparse.SUPPRESS)
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

    if args.memory_probe or args.experiment_probe:
        impl = args.memory_probe or args.experiment_probe
        print(json.dumps(memory_probe(impl, args.first_order_only, args, variant=bool(args.experiment_probe))))
        return

    batches = make_batches(4, args.tasks, args.device, args.seed)
    cpu = platform.processor() or platform.machine()
    if args.device.type == "cuda":
        cpu = torch.cuda.get_device_name(args.device)
    print(f"Meta-SGD throughput: ConvNet4 (64 ch, 28x28x1, {args.downsample}), {WAYS}-way {SHOTS}-shot, "
          f"{QUERIES} queries/class, {args.tasks} tasks/step, 1 inner step")
    print(f"device {args.device} ({cpu}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, vectorize={args.vectorize}{', bf16 autocast (ours)' if args.bf16 else ''}")
    print(f"load average before: {load()} (other processes on these CPUs slow every implementation down)")
    if args.profile:
        profile(batches, args)
        return
    if args.experiments:
        experiments(batches, args)
        return

    for first_order in orders(args):
        label = "first order" if first_order else "second order"
        print(f"\n{label}: {args.steps} timed steps per implementation in {args.rounds} round(s)", flush=True)
        results = benchmark_order(first_order, batches, args)
        memory = {} if args.no_memory else {impl: measure_memory(impl, first_order, args) for impl in IMPLS}
        rate = {}
        print(f"  {'implementation':30s} {'s/step':>7s} {'(min-max)':>15s} {'alone':>6s} {'tasks/s':>8s}  "
              f"{'first meta-loss':>15s}" + ("" if args.no_memory else f"  {'peak MiB':>9s} {'(+ over start)':>15s}"))
        names = {"l2l": "(1) learn2learn MetaSGD", "core": "(2) our core (no Lightning)", "lightning": "(3) our LightningModule"}
        for impl in IMPLS:
            st = summarize(results[impl]["times"], args.busy_threshold)
            rate[impl] = args.tasks / st["median"]
            line = (f"  {names[impl]:30s} {st['median']:7.3f} ({st['min']:6.3f}-{st['max']:6.3f}) "
                    f"{st['clean']:>3d}/{st['total']:<2d} {rate[impl]:8.2f}  {results[impl]['first_loss']:15.6f}")
            if impl in memory:
                m = memory[impl]
                line += f"  {m['peak_mib']:9.0f} {'(+' + format(m['peak_mib'] - m['before_mib'], '.0f') + ')':>15s}"
            print(line)
        print(f"  (3)/(1) speed-up over learn2learn: {rate['lightning'] / rate['l2l']:.2f}x   "
              f"(2)/(1): {rate['core'] / rate['l2l']:.2f}x   "
              f"Lightning overhead (2)/(3) - 1: {100 * (rate['core'] / rate['lightning'] - 1):+.1f}%", flush=True)
        print(f"  load average after: {load()}")


if __name__ == "__main__":
    main()
