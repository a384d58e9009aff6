"""The roofline of ``python -m benchmarks.throughput``: the FLOP count follows the double backward, the table's
fractions, and a smoke run that prints the roofline on CPU."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import throughput
from metasgd_lightning import MetaSGD
from metasgd_lightning.methods.models import ConvNet4

REPO = Path(__file__).resolve().parents[1]


def _conv_flops(counter) -> int:
    return counter.by_op.get("convolution", 0) + counter.by_op.get("convolution_backward", 0)


def _forward_conv_flops(model: ConvNet4, images: int) -> tuple[int, int]:
    """Analytic conv FLOPs of a forward of ``images`` images: all layers, and the first layer alone."""
    flops, size, channels, first = 0, model.image_size, model.in_channels, None
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            layer_flops = 2 * channels * layer.out_channels * 9 * size * size * images
            first = layer_flops if first is None else first
            flops += layer_flops
            channels = layer.out_channels
        elif isinstance(layer, torch.nn.MaxPool2d):
            size //= 2
    return flops, first


def test_flop_count_follows_the_double_backward():
    """Per task, with S and Q the support and query forwards' conv FLOPs and S1, Q1 their first layers':
    first order S + (2S - S1) + Q + (2Q - Q1) + S (the support loss after the step, recorded); second
    order adds the double backward, 6S - 3S1: the two derivatives of each backward convolution (4S - S1)
    and a backward through the support forward again (2S - 2S1)."""
    torch.manual_seed(0)
    model = ConvNet4(out_features=3, hidden_channels=8, image_size=16)
    ways, shots, queries, tasks = 3, 1, 4, 2
    batch = (torch.randn(tasks, ways * shots, 1, 16, 16), torch.arange(ways).repeat(tasks, 1),
             torch.randn(tasks, ways * queries, 1, 16, 16), torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1))
    S, S1 = _forward_conv_flops(model, ways * shots)
    Q, Q1 = _forward_conv_flops(model, ways * queries)
    counted = {}
    for first_order in (True, False):
        meta = MetaSGD(copy.deepcopy(model), init_lr=0.1, first_order=first_order)
        with throughput.FlopCount() as counter:
            meta.adapt_tasks(*batch, F.cross_entropy, vectorize="loop").query_loss.mean().backward()
        counted[first_order] = _conv_flops(counter) // tasks
    assert counted[True] == 4 * S + 3 * Q - S1 - Q1
    assert counted[False] == counted[True] + 6 * S - 3 * S1


def test_roofline_table_fractions():
    args = type("Args", (), {"tasks": 4, "busy_threshold": 0.15, "device": torch.device("cpu")})()
    results = {
        "gemm": {"samples": [(0.5, 0.0)], "flops": 100e9, "flops_by_op": {"mm": 100e9}},  # 200 GFLOP/s
        "net": {"samples": [(1.0, 0.0)], "flops": 50e9, "flops_by_op": {"convolution": 50e9}},  # 50 GFLOP/s
        "l2l": {"samples": [(2.0, 0.0)], "flops": 80e9, "flops_by_op": {"convolution": 80e9}},
        "core": {"samples": [(2.0, 0.0), (3.0, 0.5)], "flops": 88e9, "flops_by_op": {"convolution": 88e9}},
    }
    lines = throughput.roofline_table(["l2l", "core"], {"l2l": "l2l", "core": "core"}, results, args)
    assert "20.000 GFLOP/task" in lines[0]  # the fewest counted, per task
    for line in lines[2:4]:  # 80 GFLOP in 2 s (the step slowed by others is left out): 40 GFLOP/s
        assert line.split()[1:9] == ["2.00", "40.0", "20.0%", "80.0%", "500.0", "=", "1000.0", "+"], line
    assert "ConvNet4 forward+backward, batch 75: 50.000 GFLOP in 1000.0 ms = 50.0 GFLOP/s" in throughput.ceilings_line(results, args)


def test_user_network_roofline_counts_each_algorithm_and_both_network_ceilings():
    """--network user: each row's achieved rate uses its own algorithm's FLOPs (Reptile's are not Meta-SGD's),
    and its fraction of the network as written and of the network on channels-last images."""
    args = type("Args", (), {"tasks": 4, "busy_threshold": 0.15, "device": torch.device("cpu"), "network": "user"})()
    results = {
        "gemm": {"samples": [(0.5, 0.0)], "flops": 100e9, "flops_by_op": {"mm": 100e9}},  # 200 GFLOP/s
        "net": {"samples": [(1.0, 0.0)], "flops": 50e9, "flops_by_op": {"convolution": 50e9}},  # 50 GFLOP/s
        "net-cl": {"samples": [(0.5, 0.0)], "flops": 50e9, "flops_by_op": {"convolution": 50e9}},  # 100 GFLOP/s
        "l2l": {"samples": [(2.0, 0.0)], "flops": 80e9, "flops_by_op": {"convolution": 80e9}},
        "lightning": {"samples": [(1.0, 0.0)], "flops": 88e9, "flops_by_op": {"convolution": 88e9}},
        "reptile": {"samples": [(4.0, 0.0)], "flops": 320e9, "flops_by_op": {"convolution": 320e9}},
    }
    lines = throughput.roofline_table(["l2l", "lightning", "reptile"], throughput.NAMES, results, args)
    assert "Meta-SGD 20.000, Reptile 80.000" in lines[0]
    rows = {name: line.split(throughput.NAMES[name])[1].split()[:5]
            for name, line in zip(["l2l", "lightning", "reptile"], lines[2:5])}
    assert rows["l2l"] == ["2.00", "40.0", "20.0%", "80.0%", "40.0%"]  # 80 GFLOP in 2 s
    assert rows["lightning"] == ["4.00", "80.0", "40.0%", "160.0%", "80.0%"]  # Meta-SGD's 80, not its own 88
    assert rows["reptile"] == ["1.00", "80.0", "40.0%", "160.0%", "80.0%"]  # Reptile's own 320 in 4 s
    assert "the same on channels-last images, batch 75: 50.000 GFLOP in 500.0 ms = 100.0 GFLOP/s" in (
        throughput.ceilings_line(results, args))


@pytest.mark.cost(10)  # seconds, for the order of the parallel run (conftest.py)
def test_quick_run_prints_the_roofline_on_cpu(monkeypatch, capsys):
    """``python -m benchmarks.throughput --quick`` by its ``main`` in this process. Of the fresh processes it starts,
    one per implementation and ceiling, the first is a real one (its command line and JSON answer); the others run
    the same ``worker`` here, with the arguments a fresh process would parse: each fresh interpreter costs seconds
    of imports, and a smoke run checks the tables, not the timings."""
    real_spawn, spawned = throughput.spawn, []

    def spawn(name, first_order, steps, args, profile=False):
        spawned.append(name)
        if len(spawned) == 1 or profile:
            return real_spawn(name, first_order, steps, args, profile)
        child = copy.copy(args)
        child.steps, child.worker, child.order = steps, name, "first" if first_order else "second"
        return json.loads(json.dumps(throughput.worker(name, first_order, child)))  # as it crosses the pipe

    monkeypatch.setattr(throughput, "spawn", spawn)
    monkeypatch.setattr(sys, "argv", ["throughput", "--quick", "--tasks", "1", "--no-wait", "--second-order-only",
                                      "--device", "cpu"])
    monkeypatch.chdir(REPO)
    throughput.main()
    assert len(spawned) == len(throughput.IMPLS) + len(throughput.CEILINGS)
    out = capsys.readouterr().out
    assert "ceilings (same turns" in out and "fp32 GEMM (2048²)" in out and "ConvNet4 forward+backward, batch 75" in out
    assert "of net fwd+bwd" in out
    for name in (throughput.NAMES[impl] for impl in throughput.IMPLS):
        assert sum(line.startswith(f"  {name}") for line in out.splitlines()) == 2, name  # time table and roofline
