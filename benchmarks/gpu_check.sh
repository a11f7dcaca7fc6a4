#!/usr/bin/env bash
# The prepared GPU check, one command for a short device lease (about 5 minutes on an H200):
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with CUDA, torch, triton
# 1. the fused=True (Triton) kernels against the for-loop, compiled for the GPU (tests/test_kernels.py runs
#    them in Triton's CPU interpreter elsewhere), and the other optimizer tests;
# 2. `sage-optim bench` on Llama-130M and Llama-1.3B-layer shapes, fused paths included.
# Logs go to $OUT (the device tool's folder) or ./gpu-check; copy the tables into docs/benchmarks.md.
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kernels.py tests/test_bench.py \
    tests/test_optimizers.py tests/test_sage_math.py tests/test_sinkgd_math.py 2>&1 | tee "$out/tests.log"
for preset in llama-130m llama-1.3b-layer; do
    timeout 120 python3 -m sage_optim.bench --preset "$preset" --repeats 20 --device cuda 2>&1 | tee "$out/bench-$preset.txt"
done
