#!/usr/bin/env bash
# The GPU checks of this project in one short script (about 6 minutes on one H100/H200):
#   1. benchmarks/throughput.py: learn2learn vs our core vs our LightningModule, second and first order,
#      with our inner loop vectorised (vmap, the default on CUDA), then with the per-task loop, then in bf16,
#      then with a backward every task / every 8 tasks (memory against speed);
#   2. benchmarks/precision_check.py: short 32-true / bf16-mixed / 16-mixed training runs on the GPU.
# Usage: bash benchmarks/gpu_check.sh OUTDIR    (Python with torch, lightning, torchmetrics, learn2learn)
set -uo pipefail
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__,
'torchmetrics', torchmetrics.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout 200 $py benchmarks/throughput.py --device cuda --steps 10 --rounds 1 --no-wait 2>&1 | tee "$out/throughput_gpu.txt"
timeout 90 $py benchmarks/throughput.py --device cuda --steps 10 --rounds 1 --no-wait --second-order-only \
    --vectorize loop 2>&1 | tee "$out/throughput_gpu_loop.txt"
timeout 90 $py benchmarks/throughput.py --device cuda --steps 10 --rounds 1 --no-wait --second-order-only \
    --bf16 2>&1 | tee "$out/throughput_gpu_bf16.txt"
timeout 90 $py benchmarks/throughput.py --device cuda --steps 10 --rounds 1 --no-wait --second-order-only --experiments \
    --only "core (as today);core, backward every task;core, backward every 8 tasks" 2>&1 | tee "$out/throughput_gpu_chunks.txt"
timeout 150 $py benchmarks/precision_check.py --accelerator gpu --steps 300 2>&1 | tee "$out/precision_gpu.txt"
