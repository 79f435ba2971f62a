#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (this project's CI machine has none):
#   - tests/test_cuda.py: the per-step gradguard path inside a real Trainer.fit on the GPU under
#     torch.cuda.set_sync_debug_mode("error"), so CUDA itself fails any host synchronisation; norms, clipping
#     and quantization on the GPU; bf16-mixed;
#   - the CUDA cases of the guard and clipping tests: AMP overflow (precision="16-mixed" with a GradScaler), skip
#     and rewind (pinned-CPU and on-device snapshots) restoring bitwise, checkpoint resume with state on the GPU;
#   - benchmarks/overhead.py --device cuda: per-step costs against clip_grad_norm_ on the GPU, and the monitor's
#     share of a Trainer.fit step there; then the kernel-only cases on a 134M-parameter model (8 x Linear 4096).
# Run from anywhere on a machine with one CUDA device (about 3 minutes):
#     bash scripts/gpu_check.sh
# It needs torch (a CUDA build), lightning, torchmetrics, tensorboard and pytest importable by ${PYTHON:-python3};
# zclip and autoclip are optional (their benchmark cases are skipped without them, their tests need them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
clip_tests=tests/test_clipping.py  # it compares against zclip and autoclip, so it imports them
if ! "$PY" -c "import zclip, autoclip" 2>/dev/null; then
    echo "zclip/autoclip not importable: skipping tests/test_clipping.py (pip install zclip==1.0.0 autoclip==0.2.1," \
         "or put their package folders on PYTHONPATH, to run its CUDA resume cases)"
    clip_tests=""
fi
"$PY" -m pytest -q tests/test_cuda.py tests/test_guard.py $clip_tests -k "cuda or gpu"
"$PY" benchmarks/overhead.py --device cuda --rounds 50
"$PY" benchmarks/overhead.py --device cuda --rounds 40 --skip-fit --blocks 8 --width 4096
