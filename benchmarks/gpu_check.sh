#!/usr/bin/env bash
# The GPU check of refmoe.fast, run from the repository root on a machine with one CUDA GPU:
#   (a) the fast-path tests with CuPy (every kernel against its reference, the step against the core),
#   (b) the peer benchmark (refmoe's fast step, its CUDA-graph replay and the earlier path against torch and JAX).
# Logs go to $OUT (when set) and to benchmarks/results/. Budget: about 6 minutes on an H200.
#     bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
LOGDIR="${OUT:-benchmarks/results}"
mkdir -p "$LOGDIR" benchmarks/results
JSON=benchmarks/results/$(date -u +%F)_h200_peers_float32.json
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

{
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC')  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi || true
  python3 - <<'PY'
import importlib
for name in ("numpy", "scipy", "cupy", "torch", "jax", "jaxlib"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {m.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: not importable ({exc})")
try:
    import cupy
    print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
    print(cupy.cuda.runtime.getDeviceProperties(0)["name"])
except Exception as exc:  # noqa: BLE001
    print("cupy device:", exc)
try:
    import torch
    print("torch cuda", torch.version.cuda, torch.cuda.is_available())
except Exception:  # noqa: BLE001
    pass
try:
    import jax
    print("jax devices", jax.devices())
except Exception as exc:  # noqa: BLE001
    print("jax devices:", exc)
PY
} 2>&1 | tee "$LOGDIR/gpu_env.log"

echo "== (a) fast-path tests on the GPU  [$(elapsed) s]" | tee "$LOGDIR/gpu_tests.log"
REFMOE_BACKEND=cupy timeout 200 python3 -m pytest -q tests/test_fast*.py -p no:cacheprovider -rf 2>&1 \
  | tee -a "$LOGDIR/gpu_tests.log"
echo "tests exit ${PIPESTATUS[0]}  [$(elapsed) s]" | tee -a "$LOGDIR/gpu_tests.log"

echo "== (b) benchmark  [$(elapsed) s]" | tee "$LOGDIR/gpu_bench.log"
LEFT=$(( 345 - $(elapsed) )); [ "$LEFT" -lt 120 ] && LEFT=120
timeout "$LEFT" python3 benchmarks/bench_peers.py --backend cupy --shapes small 16b --dtypes float32 --profile \
  --reps 5 --json "$JSON" 2>&1 | tee -a "$LOGDIR/gpu_bench.log"
RC=${PIPESTATUS[0]}
echo "bench exit $RC  [$(elapsed) s]" | tee -a "$LOGDIR/gpu_bench.log"
cp -f "$JSON" "$LOGDIR/" 2>/dev/null || true

# a failing bench: the small shape again with the kernels replaced by their CuPy references, to tell a
# kernel fault from the rest (only when time is left)
if [ "$RC" -ne 0 ] && [ "$(elapsed)" -lt 290 ]; then
  echo "== (c) small shape with REFMOE_FAST_KERNELS=0  [$(elapsed) s]" | tee "$LOGDIR/gpu_bench_refs.log"
  REFMOE_FAST_KERNELS=0 timeout $(( 350 - $(elapsed) )) python3 benchmarks/bench_peers.py --backend cupy \
    --shapes small --dtypes float32 --reps 5 --no-memory --impls refmoe refmoe_objective torch_batched 2>&1 \
    | tee -a "$LOGDIR/gpu_bench_refs.log"
fi
echo "== done in $(elapsed) s" | tee -a "$LOGDIR/gpu_bench.log"
