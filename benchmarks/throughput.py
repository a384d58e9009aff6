"""Meta-training throughput: learn2learn vs our core vs our LightningModule, on identical batches.

The Omniglot setting: :class:`~metasgd_lightning.methods.models.ConvNet4` (64 channels, 28x28 grey images,
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

Roofline. Each worker counts the FLOPs of its untimed warm-up step: the FLOP formulas of
``torch.utils.flop_counter`` (convolutions and matrix products, forward and backward) under a plain
``TorchDispatchMode``, which sees every aten op of the forward, the backward and the double backward
(torch's ``FlopCounterMode`` itself tracks modules with hooks that refuse ``torch.autograd.grad``, so it
cannot run an inner loop; a double backward of a convolution reaches the dispatcher as convolutions,
counted like any other). Element-wise work (batch norm, ReLU, pooling, the SGD step) counts no FLOPs.
The formulas ignore a convolution's groups in the weight gradient, so under ``vmap`` (per-task weights as
groups) they count T times that work; and our step adds one support forward (the support loss after the
step, recorded). The achieved GFLOP/s of every row therefore use the algorithm's count, the fewest any
implementation counted (learn2learn's; the count of a row is printed beside it): 5.214 GFLOP per task for
the Omniglot setting, second order, and checked against a per-layer count in ``tests/test_throughput.py``.
In the same turns, fresh processes measure two ceilings of the machine: ``gemm``, an fp32 matrix
product (2048² on CPU, 8192² on CUDA, TF32 off), and ``net``, the network's own forward+backward
(cross-entropy, gradients of all weights) at the query batch size (75 images), FLOPs counted the same
way. The roofline table gives each implementation's tasks/s, achieved GFLOP/s (counted FLOPs per step
over the median step time) and its fraction of either ceiling.

Your own network (``--network user``): the same setting with a network a user writes from standard torch
layers, :func:`user_network` (``nn.Conv2d``, ``nn.BatchNorm2d(track_running_stats=False)``, ``nn.ReLU``,
``nn.MaxPool2d``, ``nn.Flatten``, ``nn.Linear``; NCHW input; ConvNet4's shapes), so that none of ConvNet4's
own speed-ups apply. Beside learn2learn's MetaSGD and our core and module, in the same turns: our module with
its fast paths off (``channels_last=False, fast_batch_norm=False``: the network as given), learn2learn's MAML
against our ``MAMLLightningModule``, and in the first-order pass our ``ReptileLightningModule`` (5 inner Adam
steps on all 80 images of a task; its rate uses its own FLOP count). Three ceilings of the network:
``net``, its forward+backward as written (NCHW); ``net-cl``, the same on channels-last images; and
``net-fast``, the same with the fast paths every method applies (its batch norms swapped for
``TaskBatchNorm2d``, channels-last images).

    python -m benchmarks.throughput                      # second and first order, real sizes, roofline
    python -m benchmarks.throughput --network user --write   # your own network: standard layers, all methods
    python -m benchmarks.throughput --quick              # a smoke run: 4 tasks, 2 steps
    python -m benchmarks.throughput --profile            # where the time of one step goes
    python -m benchmarks.throughput --profile-lightning  # where Lightning's time per step goes (cProfile)
    python -m benchmarks.throughput --experiments        # candidate speed-ups, measured the same way
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

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.learn2learn_import import import_learn2learn
from metasgd_lightning import MetaSGD
from metasgd_lightning.commands._quiet import silence_lightning_noise
from metasgd_lightning.methods.models import ConvNet4

REPO = Path(__file__).resolve().parents[1]

IMPLS = ("l2l", "core", "lightning")
NAMES = {"l2l": "(1) learn2learn MetaSGD", "core": "(2) our core (no Lightning)", "lightning": "(3) our LightningModule",
         "lightning-plain": "(3') our LightningModule, fast paths off", "l2l-maml": "(4) learn2learn MAML",
         "maml": "(5) our MAMLLightningModule", "reptile": "(6) our ReptileLightningModule"}
# --network user: the rows of each pass (Reptile is first order by nature: its pass only).
USER_IMPLS = {False: ("l2l", "core", "lightning", "lightning-plain", "l2l-maml", "maml"),
              True: ("l2l", "core", "lightning", "lightning-plain", "l2l-maml", "maml", "reptile")}
# The algorithm a row runs: achieved GFLOP/s count the fewest FLOPs any row of the same algorithm counted.
ALGORITHM = {"l2l-maml": "MAML", "maml": "MAML", "reptile": "Reptile"}
LIGHTNING_ROWS = ("lightning", "lightning-plain", "maml", "reptile")
CEILINGS = ("gemm", "net")
CEILING_NAMES = {"gemm": "fp32 GEMM", "net": f"ConvNet4 forward+backward, batch {5 * 15}"}
USER_CEILING_NAMES = {"gemm": "fp32 GEMM", "net": f"your network's forward+backward as written (NCHW), batch {5 * 15}",
                      "net-cl": f"the same on channels-last images, batch {5 * 15}",
                      "net-fast": f"the same with the methods' fast paths (TaskBatchNorm2d, channels-last), batch {5 * 15}"}
# The network's own forward+backward: as written, on channels-last images, with the fast paths the methods apply.
NET_CEILINGS = ("net", "net-cl", "net-fast")
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


def user_network(hidden: int = 64) -> nn.Sequential:
    """A user's own ConvNet from standard torch layers, ConvNet4's shapes (28x28 grey images, 5 classes)."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else hidden, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, WAYS))


def make_model(args) -> nn.Module:
    torch.manual_seed(args.seed)
    if args.network == "user":
        return user_network().to(args.device)
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


def l2l_step_fn(model: nn.Module, first_order: bool, args, algorithm: str = "MetaSGD") -> Callable[[Batch], float]:
    l2l = import_learn2learn()
    meta = getattr(l2l.algorithms, algorithm)(copy.deepcopy(model), lr=INIT_LR, first_order=first_order)
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


def graph_step_fn(model: nn.Module, first_order: bool, args) -> Callable[[Batch], float]:
    """Our core's step replayed as one CUDA graph (:class:`~metasgd_lightning.training.cuda_graph.CudaGraphStep`,
    vmap inner loop); its first call runs the eager warm-up step and the capture (untimed, as warm-up)."""
    from metasgd_lightning.training.cuda_graph import CudaGraphStep

    meta = MetaSGD(copy.deepcopy(model), init_lr=INIT_LR, first_order=first_order)
    optimizer = torch.optim.Adam(meta.parameters(), lr=META_LR)
    graph = CudaGraphStep(meta, optimizer, F.cross_entropy, warmup_steps=1,
                          log=lambda line: print(line, file=sys.stderr, flush=True))

    def step(batch: Batch) -> float:
        loss = float(graph(batch).query_loss.mean())
        if graph.calls == 1:
            graph(batch)  # the capture (and a replay), outside the timed steps
        return loss

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


def lightning_module(row: str, model: nn.Module, first_order: bool, args):
    """The LightningModule of a row of ``LIGHTNING_ROWS``: Meta-SGD (fast paths on or off), MAML or Reptile."""
    from metasgd_lightning import MAMLLightningModule, MetaSGDLightningModule, ReptileLightningModule

    common = dict(task="classification", vectorize=args.vectorize, optimizer=functools.partial(torch.optim.Adam, lr=META_LR))
    if row == "maml":
        return MAMLLightningModule(model, inner_lr=INIT_LR, first_order=first_order, **common)
    if row == "reptile":  # the paper's Omniglot inner loop: 5 Adam steps of lr 1e-3, β1 = 0
        return ReptileLightningModule(model, inner_steps=5, inner_lr=1e-3, inner_optimizer="adam", anneal=False,
                                      **common)
    paths = dict(channels_last=False, fast_batch_norm=False) if row == "lightning-plain" else {}
    return MetaSGDLightningModule(model, init_lr=INIT_LR, first_order=first_order, **paths, **common)


def run_lightning(model: nn.Module, first_order: bool, batches: list[Batch], steps: int, args,
                  flops: FlopCount | None = None, profiler=None, row: str = "lightning") -> tuple[list, list[float]]:
    """``Trainer.fit`` of the module of ``row`` for one warm-up step (its FLOPs counted into ``flops``) and
    ``steps`` timed ones (a ``cProfile.Profile`` ``profiler`` on during them); (step samples, meta-losses)."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

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

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0 and flops is not None:
                flops.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(args.device)
            if batch_idx == 0 and flops is not None:
                flops.__exit__(None, None, None)
            if batch_idx > 0:  # step 0 warms up
                self.samples.append(self.clock.stop())
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            if profiler is not None and batch_idx == steps:
                profiler.disable()
            if batch_idx < steps:
                if profiler is not None and batch_idx == 0:
                    profiler.enable()
                self.clock.start()

    module = lightning_module(row, copy.deepcopy(model), first_order, args)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device.type == "cuda" else "cpu", devices=1, max_steps=steps + 1,
        precision="bf16-mixed" if args.bf16 else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(module, DataLoader(Batches(), batch_size=None, shuffle=False))
    return timer.samples, timer.losses


# -- FLOPs and the machine's ceilings (roofline) -----------------------------------------------------------


class FlopCount:
    """FLOPs of the aten ops run inside it, by torch.utils.flop_counter's formulas (see the module docstring)."""

    def __init__(self) -> None:
        from torch.utils.flop_counter import flop_registry

        from metasgd_lightning._internals.torch_internals import torch_dispatch_mode

        self.by_op: dict[str, int] = {}
        counter = self

        class _Mode(torch_dispatch_mode()):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func.overloadpacket)
                if formula is not None:
                    name = str(func.overloadpacket).removeprefix("aten.")
                    counter.by_op[name] = counter.by_op.get(name, 0) + int(formula(*args, **kwargs, out_val=out))
                return out

        self.mode = _Mode()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self) -> FlopCount:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def ceiling_fn(name: str, args) -> Callable[[], None]:
    """One call of a ceiling: ``gemm`` (an fp32 matrix product), ``net`` (forward+backward of the network) or
    ``net-cl`` (the same on channels-last images) or ``net-fast`` (and with the batch norms the methods swap in)."""
    if name == "gemm":
        torch.backends.cuda.matmul.allow_tf32 = False
        n = 8192 if args.device.type == "cuda" else 2048
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(args.device) for _ in range(2))
        return lambda: torch.mm(a, b)
    model = make_model(args)
    x = make_batches(1, 1, args.device, args.seed)[0][2][0]  # one task's 75 query images
    if name in ("net-cl", "net-fast"):
        x = x.clone(memory_format=torch.channels_last)
    if name == "net-fast":
        from metasgd_lightning.methods.fast_paths import use_task_batch_norm

        use_task_batch_norm(model)
    y = torch.arange(WAYS, device=args.device).repeat_interleave(QUERIES)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return forward_backward


def ceiling_worker(name: str, args) -> dict:
    """The ceiling ``name`` in this process: a counted warm-up call, then ``args.steps`` timed samples."""
    call = ceiling_fn(name, args)
    before = memory_now(args.device)
    with FlopCount() as flops:
        call()
    sync(args.device)
    start = time.perf_counter()
    call()
    sync(args.device)
    once = time.perf_counter() - start
    reps = max(1, round(0.25 / max(once, 1e-6)))  # a sample of about 0.25 s, timed as one step
    clock, samples = StepClock(args), []
    for _ in range(args.steps):
        sync(args.device)
        clock.start()
        for _ in range(reps):
            call()
        sync(args.device)
        seconds, others = clock.stop()
        samples.append((seconds / reps, others))
    return {"samples": samples, "first_loss": float("nan"), "before_mib": before, "peak_mib": memory_peak(args.device),
            "flops": flops.total, "flops_by_op": flops.by_op}


# -- candidate speed-ups (--experiments) ----------------------------------------------------------------------


VARIANTS: dict[str, dict] = {
    "l2l (as today)": dict(impl="l2l"),
    "core (as today)": dict(impl="core"),
    "core, backward every task": dict(impl="core", chunk=1),
    "core, backward every 8 tasks": dict(impl="core", chunk=8),
    "core + channels_last weights": dict(impl="core", channels_last=True),
    # What the CPU paths of metasgd_lightning.methods.models bring (see apply_options):
    "core, NCHW input": dict(impl="core", nchw=True),
    "core, torch's batch-norm double backward": dict(impl="core", torch_bn=True),
    "core, NCHW + torch's batch-norm double backward (before)": dict(impl="core", nchw=True, torch_bn=True),
    "l2l, NCHW input (before)": dict(impl="l2l", nchw=True, torch_bn=True),
    "net fwd+bwd, NCHW input": dict(impl="net", nchw=True),
    "core, 1 thread": dict(impl="core", threads=1),
    "core vmap": dict(impl="core", vectorize="vmap"),
    "core, CUDA graph (vmap)": dict(impl="graph"),
    "core loop": dict(impl="core", vectorize="loop"),
    "l2l, glibc heap kept": dict(impl="l2l", env=KEEP_HEAP),
    "core, glibc heap kept": dict(impl="core", env=KEEP_HEAP),
    "core + bf16 autocast": dict(impl="core", bf16=True),
    "core, backward every task + bf16": dict(impl="core", chunk=1, bf16=True),
}


def options_of(name: str) -> dict:
    return {"impl": name, **VARIANTS.get(name, {})}


def apply_options(options: dict) -> None:
    """Process-wide switches of a variant: threads; ``nchw``: ConvNet4 without its channels-last copy of
    the input on CPU; ``torch_bn``: TaskBatchNorm2d with torch's own batch-norm double backward."""
    from metasgd_lightning.methods import fast_paths, models

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    if options.get("nchw"):
        models.channels_last_on_cpu = fast_paths.channels_last_on_cpu = lambda x: x
    if options.get("torch_bn"):
        fast_paths.TaskBatchNorm2d.fused_double_backward = False


def build_step(name: str, first_order: bool, args) -> Callable[[Batch], float]:
    """The step function of an implementation (``l2l``, ``core``) or of a variant of ``VARIANTS``."""
    options = options_of(name)
    apply_options(options)
    model = make_model(args)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    sub = argparse.Namespace(**{**vars(args), "bf16": options.get("bf16", args.bf16),
                                "vectorize": options.get("vectorize", args.vectorize)})
    if options.get("chunk"):
        return chunked_backward_step_fn(model, first_order, sub, options["chunk"])
    if options["impl"] == "graph":
        return graph_step_fn(model, first_order, sub)
    if options["impl"] == "l2l-maml":
        return l2l_step_fn(model, first_order, sub, algorithm="MAML")
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
    """Warm-up step (its FLOPs counted), then ``args.steps`` timed steps of ``name``, in this (fresh) process."""
    if options_of(name)["impl"] in (*CEILINGS, *NET_CEILINGS):
        apply_options(options_of(name))
        return ceiling_worker(options_of(name)["impl"], args)
    batches = make_batches(4, args.tasks, args.device, args.seed)
    before = memory_now(args.device)
    flops = FlopCount()
    if name in LIGHTNING_ROWS:
        samples, losses = run_lightning(make_model(args), first_order, batches, args.steps, args, flops, row=name)
        first_loss = losses[0]
    else:
        step = build_step(name, first_order, args)
        with flops:
            first_loss = step(batches[0])
        clock, samples = StepClock(args), []
        for i in range(args.steps):
            sync(args.device)
            clock.start()
            step(batches[(i + 1) % len(batches)])
            sync(args.device)
            samples.append(clock.stop())
    return {"samples": samples, "first_loss": first_loss, "before_mib": before, "peak_mib": memory_peak(args.device),
            "flops": flops.total, "flops_by_op": flops.by_op}


def profile_lightning(first_order: bool, args) -> None:
    """Where Lightning's time per step goes: cProfile over the timed steps of ``Trainer.fit`` (after the
    warm-up step), the Python functions by own time and by cumulative time, and the step times."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    batches = make_batches(4, args.tasks, args.device, args.seed)
    samples, _ = run_lightning(make_model(args), first_order, batches, args.steps, args, profiler=profiler)
    seconds = statistics.median(t for t, _ in samples)
    label = f"lightning, {'first' if first_order else 'second'} order"
    print(f"\n== cProfile of {args.steps} Lightning steps ({label}): median step {1e3 * seconds:.1f} ms with the "
          "profiler on (Python calls cost more under it)")
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.profile_rows)
        print(f"-- by {order} --")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()
                        and not line.startswith(("   Ordered", "   List reduced"))))


def profile_worker(name: str, first_order: bool, args) -> None:
    """torch.profiler over one step of ``name`` after a warm-up step, in this process (cProfile for Lightning)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if name == "lightning":
        profile_lightning(first_order, args)
        return

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
    out = ["--device", str(args.device), "--tasks", str(args.tasks), "--network", args.network,
           "--downsample", args.downsample,
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
    command = [sys.executable, "-m", "benchmarks.throughput", "--profile-one" if profile else "--worker", name,
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
            res.setdefault("flops", out.get("flops"))
            res.setdefault("flops_by_op", out.get("flops_by_op"))
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


def ceilings_line(results: dict[str, dict], args) -> str:
    """The machine's ceilings measured in these turns (and ceiling variants), in GFLOP/s."""
    names = USER_CEILING_NAMES if getattr(args, "network", "convnet4") == "user" else CEILING_NAMES
    parts = []
    for name in [n for n in results if options_of(n)["impl"] in (*CEILINGS, *NET_CEILINGS)]:
        seconds = summarize(results[name]["samples"], args.busy_threshold)["median"]
        label = names.get(name, name) + (f" ({8192 if args.device.type == 'cuda' else 2048}²)" if name == "gemm" else "")
        gflop = results[name]["flops"] / 1e9
        parts.append(f"{label}: {gflop:.3f} GFLOP in {1e3 * seconds:.1f} ms = {gflop / seconds:.1f} GFLOP/s")
    return "  ceilings (same turns, fresh processes, medians): " + "; ".join(parts)


def roofline_table(names: list[str], labels: dict[str, str], results: dict[str, dict], args) -> list[str]:
    """tasks/s, counted GFLOP per task, achieved GFLOP/s and the fraction of each ceiling, per implementation."""
    nets = [n for n in NET_CEILINGS if n in results]
    ceiling = {name: results[name]["flops"] / summarize(results[name]["samples"], args.busy_threshold)["median"]
               for name in ("gemm", *nets)}
    width = max(len(labels[name]) for name in names)
    # The work of an algorithm: the fewest FLOPs any implementation of it counted (ours adds a support forward
    # after the step, under no_grad, to record the adaptation gain; it is not counted as achieved work).
    algorithm = {name: ALGORITHM.get(name, "Meta-SGD") for name in names}
    useful = {a: min(results[n]["flops"] for n in names if algorithm[n] == a) for a in algorithm.values()}
    if len(useful) == 1:
        lines = [f"  roofline: achieved GFLOP/s = {next(iter(useful.values())) / args.tasks / 1e9:.3f} GFLOP/task "
                 "(the algorithm's, the fewest counted) x tasks/s"]
    else:
        lines = ["  roofline: achieved GFLOP/s = GFLOP/task of the algorithm (the fewest any of its rows counted: "
                 + ", ".join(f"{a} {v / args.tasks / 1e9:.3f}" for a, v in useful.items()) + ") x tasks/s"]
    net_columns = "".join(f" {'of ' + ('net fwd+bwd' if n == 'net' else n):>14s}" for n in nets)
    lines.append(f"  {'implementation':{width}s} {'tasks/s':>8s} {'GFLOP/s':>8s} {'of GEMM':>8s}{net_columns}  "
                 f"{'ms/task = net fwd+bwd + rest':>28s}  {'counted GFLOP/task':>18s}  by op")
    net_ms = 1e3 * summarize(results["net"]["samples"], args.busy_threshold)["median"]
    for name in names:
        seconds = summarize(results[name]["samples"], args.busy_threshold)["median"]
        flops = results[name]["flops"]
        achieved = useful[algorithm[name]] / seconds
        by_op = ", ".join(f"{op} {v / args.tasks / 1e9:.3f}" for op, v in sorted(results[name]["flops_by_op"].items(),
                                                                                   key=lambda kv: -kv[1]) if v >= 1e6)
        fractions = "".join(f" {100 * achieved / ceiling[n]:13.1f}%" for n in nets)
        lines.append(f"  {labels[name]:{width}s} {args.tasks / seconds:8.2f} {achieved / 1e9:8.1f} "
                     f"{100 * achieved / ceiling['gemm']:7.1f}%{fractions}  "
                     f"{1e3 * seconds / args.tasks:10.1f} = {net_ms:6.1f} + {1e3 * seconds / args.tasks - net_ms:7.1f}  "
                     f"{flops / args.tasks / 1e9:18.3f}  {by_op}")
    lines.append("  (net fwd+bwd: one task's query pass, 75 images, at the network's own forward+backward speed; the rest is "
                 "the support pass, the double backward and bookkeeping" + (
                     "; net-cl: the same on channels-last images; net-fast: with the fast paths)" if "net-cl" in nets
                     else ")"))
    return lines


def user_network_pass(first_order: bool, args) -> list[str]:
    """``--network user``: every row of ``USER_IMPLS`` and the network's ceilings, in turns; the tables printed
    (and returned) with the ratios."""
    label = "first order" if first_order else "second order"
    impls = list(USER_IMPLS[first_order])
    print(f"\n{label}, your own network: {args.steps} timed steps per implementation in {args.rounds} round(s)",
          flush=True)
    results = run_turns(impls + ["gemm", *NET_CEILINGS], first_order, args)
    width = max(len(NAMES[impl]) for impl in impls)
    reference = summarize(results["l2l"]["samples"], args.busy_threshold)["median"]
    lines = [f"{label}:", _header(width, "implementation", True)]
    seconds = {}
    for impl in impls:
        line, seconds[impl] = _row(NAMES[impl], results[impl], args, width, reference)
        lines.append(line)
    lines.append(f"  Meta-SGD (3)/(1) speed-up over learn2learn: {seconds['l2l'] / seconds['lightning']:.2f}x   "
                 f"MAML (5)/(4): {seconds['l2l-maml'] / seconds['maml']:.2f}x   "
                 f"the fast paths (3)/(3'): {seconds['lightning-plain'] / seconds['lightning']:.2f}x")
    lines.append(ceilings_line(results, args))
    lines += roofline_table(impls, NAMES, results, args)
    lines.append(f"  load average: {load()}")
    print("\n".join(lines[1:]), flush=True)
    return lines


def write_user_network_section(lines: list[str], args, started: str) -> None:
    """The ``--network user`` tables as the ``throughput_user_network`` section of docs/results.md."""
    import datetime

    from benchmarks._results import write_results

    command = "python -m benchmarks.throughput --network user" + "".join(
        f" --{flag} {getattr(args, flag)}" for flag in ("steps", "rounds", "tasks")
        if getattr(args, flag) != {"steps": 6, "rounds": 2, "tasks": 32}[flag]) + "".join(
        f" --{flag.replace('_', '-')}" for flag in ("first_order_only", "second_order_only", "no_wait")
        if getattr(args, flag))
    section = "\n".join([
        "## Training-step throughput on your own network (standard torch layers)",
        "",
        f"`{command}` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}; load average at start {started}. A network written only from standard "
        "torch layers (`benchmarks.throughput.user_network`: `nn.Conv2d`, `nn.BatchNorm2d(track_running_stats=False)`, "
        "`nn.ReLU`, `nn.MaxPool2d`, `nn.Linear`; NCHW input), ConvNet4's shapes, 5-way 1-shot, 15 queries per class, "
        f"{args.tasks} tasks per step, one inner step, on the same batches for every row; medians of timed steps "
        "taken by turns in fresh processes. `net fwd+bwd`: the network's own forward+backward as written; "
        "`net-cl`: the same on channels-last images; `net-fast`: the same with the fast paths every method applies "
        "(its `nn.BatchNorm2d` layers swapped for `TaskBatchNorm2d`, channels-last images). (3') is our module with `channels_last=False, "
        "fast_batch_norm=False`: the network exactly as given.",
        "",
        "```",
        *lines,
        "```",
    ])
    write_results("throughput_user_network", [{"lines": lines, "command": command}], section)


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
    parser.add_argument("--network", choices=("convnet4", "user"), default="convnet4",
                        help="convnet4: ours; user: a network of standard torch layers (user_network), all methods")
    parser.add_argument("--write", action="store_true",
                        help="--network user: write the tables to docs/results.md (section throughput_user_network)")
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
    parser.add_argument("--profile-lightning", action="store_true",
                        help="cProfile the timed steps of our LightningModule (where Lightning's time goes)")
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
    network = ("your own network (standard torch layers: Conv2d, BatchNorm2d, ReLU, MaxPool2d; 64 ch, 28x28x1)"
               if args.network == "user" else f"ConvNet4 (64 ch, 28x28x1, {args.downsample})")
    print(f"Meta-SGD throughput: {network}, {WAYS}-way {SHOTS}-shot, "
          f"{QUERIES} queries/class, {args.tasks} tasks/step, 1 inner step, Adam")
    print(f"device {args.device} ({device}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, vectorize={args.vectorize}"
          f"{', bf16 autocast (ours)' if args.bf16 else ''}")
    print(f"load average at start: {load()}")

    if args.profile or args.profile_lightning:
        for first_order in orders(args):
            for name in ("l2l", "core") if args.profile else ("lightning",):
                spawn(name, first_order, args.steps if name == "lightning" else 1, args, profile=True)
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
            results = run_turns(names + list(CEILINGS), first_order, args)
            steps = [name for name in names if options_of(name)["impl"] not in CEILINGS]
            width = max(map(len, steps))
            reference = summarize(results["l2l (as today)"]["samples"], args.busy_threshold)["median"]
            print(_header(width, "variant", True))
            for name in steps:
                print(_row(name, results[name], args, width, reference)[0])
            print(ceilings_line(results, args))
            print("\n".join(roofline_table(steps, {name: name for name in steps}, results, args)))
            print(f"  load average: {load()}", flush=True)
        return

    if args.network == "user":
        started = load()
        lines = [line for first_order in orders(args) for line in user_network_pass(first_order, args)]
        if args.write:
            write_user_network_section(lines, args, started)
        return

    for first_order in orders(args):
        label = "first order" if first_order else "second order"
        print(f"\n{label}: {args.steps} timed steps per implementation in {args.rounds} round(s)", flush=True)
        results = run_turns(list(IMPLS) + list(CEILINGS), first_order, args)
        width = max(map(len, NAMES.values()))
        print(_header(width, "implementation", False))
        seconds = {}
        for impl in IMPLS:
            line, seconds[impl] = _row(NAMES[impl], results[impl], args, width)
            print(line)
        print(f"  (3)/(1) speed-up over learn2learn: {seconds['l2l'] / seconds['lightning']:.2f}x   "
              f"(2)/(1): {seconds['l2l'] / seconds['core']:.2f}x   "
              f"Lightning overhead (3)/(2) - 1: {100 * (seconds['lightning'] / seconds['core'] - 1):+.1f}% of the step time")
        print(ceilings_line(results, args))
        print("\n".join(roofline_table(list(IMPLS), NAMES, results, args)))
        print(f"  load average: {load()}", flush=True)


if __name__ == "__main__":
    main()
