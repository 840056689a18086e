#!/usr/bin/env bash
# The one-call GPU harness. Prepare first (here): bash benchmarks/device/prepare.sh
# Then one device call:  run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=480)
# Writes at most 8 flat files under $OUT:
#   00-env.log            versions, GPU, wheel install
#   01-pytest-gpu.log     python -m pytest -m gpu (every gpu test)
#   02-bench-kernels.log  bench_kernels.py: integration (CPU vs pyFAI, GPU fused vs SpMM,
#                         from host), sigma clip, trimmed mean, FBP (CPU, GPU kernel vs SpMM)
#   03-bench-refine.log   bench_refine.py --gpu (batched LM, numba CPU vs cupy vs scipy)
#   04-bench-learned.log  bench_learned.py --device cuda --quick
#   05-cpu-scaling.log    bench_kernels.py CPU integration rows at 1 and 2 threads
#   summary.txt           each step's exit code and wall time, the test summary, the tables
# Each step has its own time cap; a step that fails or runs out of time does not stop the
# others. Total under 7 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/xrdct-device-out}
mkdir -p "$OUT"
T0=$(date +%s)
SITE=$(mktemp -d /tmp/xrdct-site.XXXX)
export PYTHONPATH="$SITE:$PWD" PYTHONDONTWRITEBYTECODE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
PY=python3
S="$OUT/summary.txt"
echo "xrdct device run $(date -u), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" > "$S"

{
  echo "=== $(date -u) host $(hostname) cores $(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1
  if [ -d .device/wheels ]; then
    $PY -m pip install -q --no-index --no-deps --target "$SITE" .device/wheels/*.whl 2>&1 | tail -5
  else
    echo "no .device/wheels: run benchmarks/device/prepare.sh and carry .device"
  fi
  # the gpu tests read ../shared/data/real: link the carried copy when the machine has none
  if [ ! -d ../shared/data/real ] && [ -d .device/real ]; then
    mkdir -p ../shared/data 2>/dev/null && ln -s "$PWD/.device/real" ../shared/data/real \
      && echo "real data: ../shared/data/real -> .device/real"
  fi
  $PY - <<'PY'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for m in ("numpy", "scipy", "cupy", "numba", "torch", "h5py", "pyFAI", "fabio", "hdf5plugin",
          "bitshuffle", "dask", "distributed", "dask_cuda", "zarr", "xarray", "pydantic",
          "pymatgen.core", "spglib", "prefect"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:<14} {getattr(mod, '__version__', '?'):<14} {getattr(mod, '__file__', '')}")
    except Exception as err:  # noqa: BLE001
        print(f"{m:<14} MISSING ({type(err).__name__}: {str(err)[:80]})")
try:
    import cupy
    print("cupy devices", cupy.cuda.runtime.getDeviceCount(), "runtime",
          cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
except Exception as err:  # noqa: BLE001
    print("cupy:", err)
try:
    import torch
    print("torch cuda:", torch.cuda.is_available(), torch.version.cuda)
except Exception as err:  # noqa: BLE001
    print("torch:", err)
from tasks._xp import gpu_status
print("gpu_status:", gpu_status())
import flows.process, tasks.integrate, tasks.reconstruct, tasks.refine, tasks.cuda_kernels  # noqa
print("project imports OK")
PY
} > "$OUT/00-env.log" 2>&1
echo "00-env: wall=$(( $(date +%s) - T0 ))s" >> "$S"

STEPS=${STEPS:-01 02 03 04 05}   # a subset for a rerun, e.g. STEPS="01" bash benchmarks/device/run.sh
step() {  # step NAME CAP_SECONDS command...
  local name=$1 cap=$2; shift 2
  case " $STEPS " in *" ${name%%-*} "*) ;; *) return 0;; esac
  local t=$(date +%s)
  echo "=== $name (cap ${cap}s, at +$(( t - T0 ))s): $*" > "$OUT/$name.log"
  timeout -k 5 "$cap" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local w=$(( $(date +%s) - t ))
  echo "=== $name rc=$rc wall=${w}s" >> "$OUT/$name.log"
  echo "$name: rc=$rc wall=${w}s (cap ${cap}s)$([ $rc = 124 ] && echo ' TIMED OUT')" >> "$S"
}

# test modules that import prefect cannot be collected there (no prefect on the machine);
# none of them holds a gpu test
step 01-pytest-gpu ${PYTEST_CAP:-150} $PY -m pytest -m gpu -p no:cacheprovider -v -rA --durations=15 \
  -o addopts="" --continue-on-collection-errors tests
step 02-bench-kernels 160 $PY benchmarks/bench_kernels.py --skip decode --gpu-frames 256
step 03-bench-refine 80 $PY benchmarks/bench_refine.py --voxels 8192 --gpu --peer-voxels 8 \
  --peer-fd-voxels 1 --peer-full-voxels 1 --numpy-voxels 64
step 04-bench-learned 50 $PY benchmarks/bench_learned.py --device cuda --quick --no-sr
# CPU scaling of the integration kernels: 1 and 2 threads (all 16 are in 02)
step 05-cpu-scaling 90 bash -c "$PY benchmarks/bench_kernels.py --skip decode fbp gpu --frames 16 --threads 1 \
  && $PY benchmarks/bench_kernels.py --skip decode fbp gpu --frames 16 --threads 2"

{
  echo; echo "pytest -m gpu:"; grep -E "^(FAILED|ERROR|PASSED|SKIPPED)|passed|failed" "$OUT/01-pytest-gpu.log" | tail -30
  for f in 02-bench-kernels 03-bench-refine 04-bench-learned 05-cpu-scaling; do
    [ -f "$OUT/$f.log" ] || continue
    echo; echo "$f:"; grep -v "^=== \|WARNING\|pyopencl" "$OUT/$f.log" | sed -n '/^xrdct kernels\|^Refinement benchmark\|^Reconstruction/,$p' | head -40
  done
  echo; echo "total $(( $(date +%s) - T0 ))s"
} >> "$S"
cat "$S"
