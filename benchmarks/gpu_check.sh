#!/usr/bin/env bash
# The GPU checks of this project in one short script (about 6 minutes on one H100/H200; FULL=1 about 5 more):
#   0. learn2learn 0.2.0 and gym from .whl/ (wheels for the device's Python 3.12, built here with
#      tools/build_learn2learn.sh; see below), installed into /tmp/site where `import learn2learn` fails;
#   1. tests/test_cuda_graph.py on the GPU: the captured training step (CUDA graph) gives the θ and α of the
#      eager step (second order, first order, 3 steps with line search, per-step rates and clipping), other
#      shapes fall back in one line, a diverged replay leaves the weights and raises;
#   2. python -m benchmarks.throughput --device cuda, second order: learn2learn vs our core vs our LightningModule
#      (vmap), with the roofline (FLOPs per step; the GPU's fp32 GEMM and the network's own forward+backward at
#      the query batch, measured in the same run; achieved GFLOP/s and fractions) and peak GPU memory;
#   3. the same with the captured step: learn2learn, our core with vmap, our core as one CUDA graph (same run);
#   4. where Lightning's time per step goes: cProfile of 10 LightningModule steps (the ~4 ms of docs/results.md).
#   FULL=1 adds first order (2, 3), the per-task loop, bf16, backward chunks and the precision runs (one file).
# Usage: bash benchmarks/gpu_check.sh OUTDIR    (python3 with torch, lightning, torchmetrics; learn2learn as above)
# From a session with a device (the `run` tool), carrying the wheels:
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Before that, once, here: tools/build_learn2learn.sh PYTHON3.12 .whl, and into .whl the py3 wheels of
#   gym==0.26.2 (pip wheel --no-deps), gym_notices, jsonargparse, docstring_parser, typeshed_client.
set -uo pipefail
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
if ! $py -c "import learn2learn" >/dev/null 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    $py -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__,
'torchmetrics', torchmetrics.__version__, torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"
    $py -c "import learn2learn; print('learn2learn', learn2learn.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$out/gpu.txt"

# 1. the captured step equals the eager step (GPU-only tests; they skip on CPU)
timeout 150 $py -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tee "$out/test_cuda_graph_gpu.txt"

# 2. roofline and throughput, second order (vmap): learn2learn, our core, our LightningModule, peak memory
timeout 150 $py -m benchmarks.throughput --device cuda --steps 10 --rounds 1 --no-wait --second-order-only 2>&1 \
    | tee "$out/throughput_gpu.txt"

# 3. the captured step against vmap and learn2learn in the same run (roofline, peak memory)
timeout 120 $py -m benchmarks.throughput --device cuda --steps 10 --rounds 1 --no-wait --second-order-only \
    --experiments --only "core vmap;core, CUDA graph (vmap)" 2>&1 | tee "$out/throughput_gpu_graph.txt"

# 4. where Lightning's ~4 ms per step go
timeout 90 $py -m benchmarks.throughput --device cuda --steps 10 --no-wait --second-order-only --profile-lightning \
    --profile-rows 30 2>&1 | tee "$out/profile_lightning_gpu.txt"

if [ "${FULL:-0}" = 1 ]; then
    {
        timeout 120 $py -m benchmarks.throughput --device cuda --steps 10 --rounds 1 --no-wait --first-order-only \
            --experiments --only "core vmap;core, CUDA graph (vmap)"
        timeout 90 $py -m benchmarks.throughput --device cuda --steps 10 --rounds 1 --no-wait --second-order-only \
            --vectorize loop
        timeout 90 $py -m benchmarks.throughput --device cuda --steps 10 --rounds 1 --no-wait --second-order-only --bf16
        timeout 90 $py -m benchmarks.throughput --device cuda --steps 10 --rounds 1 --no-wait --second-order-only \
            --experiments --only "core (as today);core, backward every task;core, backward every 8 tasks"
        timeout 150 $py -m benchmarks.precision_check --accelerator gpu --steps 300
    } 2>&1 | tee "$out/full_extras.txt"
fi
