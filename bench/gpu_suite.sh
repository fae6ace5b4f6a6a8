#!/usr/bin/env bash
# The GPU suite: on a Linux machine with an NVIDIA GPU, MLX's CUDA backend (our closest stand-in for Metal)
# and PyTorch with CUDA, in one short run:
#   conformance  every reference case in fp32 on the GPU (supir-mlx conformance)
#   bench        full-size denoiser call (fp16) and VAE passes (bf16, as the official ae_dtype), supir-mlx
#                against the official code on the same card: times, ratios, peak GPU memory (one table)
#
#   bench/gpu_suite.sh [install] [conformance] [bench]      (no phase: all three)
#
# Inputs (environment):
#   SUPIR_GPU_PACK   folder made by `python bench/gpu_pack.py` (default .gpu): wheels/ (mlx + its CUDA
#                    backend, mlx-lm, the official code's few imports) and official/ (the official code at the
#                    pinned commit). `install` puts them into this interpreter's environment (it has torch).
#   SUPIR_REFERENCE  reference directory (default tests/reference)
#   OUT              where logs, bench.json and table.md go (default gpu-suite-out)
#   PYTHON           the interpreter with torch + CUDA (default python3)
#   SUPIR_GPU_CASES  the bench's cases (compare_official.py --cases)
# Each phase can run alone (e.g. on a machine that already has the install); a failing phase does not stop
# the next one; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${SUPIR_GPU_PACK:-.gpu}
OUTDIR=${OUT:-gpu-suite-out}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# MLX compiles its CUDA kernels at first use; keep them for the next phase or run
export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-${HOME:-/tmp}/.cache/mlx-ptx}
status=0

have_cuda_mlx() {
  "$PY" -c "import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() else 1)" 2>/dev/null
}

install() {
  if have_cuda_mlx; then echo "install: MLX with CUDA already present"; return 0; fi
  [ -d "$PACK/wheels" ] || { echo "install: no $PACK/wheels (make it with bench/gpu_pack.py)"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$PACK"/wheels/*.whl || return 1
  # the CUDA backend, when packed as a tarball of its wheel's files (see gpu_pack.py --arch)
  local site
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for t in "$PACK"/wheels/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C "$site"; done
  have_cuda_mlx || { echo "install: MLX does not see a CUDA device"; return 1; }
  "$PY" -c "import mlx.core as mx, torch; print('install: mlx', mx.__version__, mx.default_device(), '| torch', torch.__version__, torch.cuda.get_device_name())"
}

conformance() {
  # fp32 means fp32: no TF32 tensor-core rounding in cuBLAS/cuDNN, whatever a library's default
  NVIDIA_TF32_OVERRIDE=0 "$PY" -c 'import sys; from supir_mlx.cli import main; sys.argv[0] = "supir-mlx"; main()' \
    conformance "${SUPIR_REFERENCE:-tests/reference}" 2>&1 | tee "$OUTDIR/conformance.log"
}

bench() {
  "$PY" bench/compare_official.py --device gpu --dtype float16 --vae-dtype bfloat16 \
    --official "$PACK/official" --torch-python "$PY" --runs 3 --warmup 1 --timeout 240 \
    --cases "${SUPIR_GPU_CASES:-denoiser:64,decode:1024,encode:1024,denoiser:128,decode:512,encode:512}" \
    --json "$OUTDIR/bench.json" 2>&1 | tee "$OUTDIR/bench.log"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUTDIR/bench.log"
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(install conformance bench)
for phase in "${phases[@]}"; do
  case "$phase" in
    install|conformance|bench) ;;
    *) echo "unknown phase $phase (install, conformance, bench)"; exit 2 ;;
  esac
  echo "== $phase"
  start=$(date +%s)
  "$phase" || { echo "== $phase FAILED"; status=1; }
  echo "== $phase took $(( $(date +%s) - start )) s"
done
exit $status
