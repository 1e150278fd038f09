#!/usr/bin/env bash
# The prepared one-GPU benchmark: FCDM-XL/256 in bf16, training step and sampling forward
# against the published-structure PyTorch module under autocast (with --topology, beside the
# preflight's deviceless memory plan for that GPU's target), the
# whole-model training step per depthwise-conv formulation, and the depthwise-conv study.
# Every result is a JSON file (plus its log) in one folder, with the machine and commit.
# The same script runs on a CPU with a tiny config (tests/test_launch_scripts.py).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_bench.sh [options] [-- fcdm_jax.bench flags for every run]

Options (each also read from the environment variable in brackets):
  --out=DIR          results folder [OUT] (default: runs/gpu_bench_DATE)
  --config=FILE      config file [CONFIG] (default: configs/xl_256.py)
  --batch=N          batch of every run [BATCH] (default: 32)
  --dtype=D          bf16 | fp32 [DTYPE] (default: bf16; PyTorch runs under autocast)
  --remat=R          none | block | dots | dots_no_batch [REMAT] (default: block, which is
                     the published per-block checkpointing on the PyTorch side)
  --impls=LIST       dwconv formulations of the training-step runs, comma-separated [IMPLS]
                     (default: xla,shift,shift_vjp)
  --topology=NAME    first compile the training step for this GPU's target without the GPU
                     (`fcdm_jax.preflight`, e.g. 1xh100, 1xh200, 1x4090; needs JAX's CUDA
                     plugin and ptxas) and print its memory plan beside the GPU's own in the
                     vs_torch run [TOPOLOGY] (default: none)
  --gpu=INDEX        the GPU to use [CUDA_VISIBLE_DEVICES] (default: 0)
  --python=EXE       Python with fcdm_jax[test] and jax[cuda12] [PYTHON] (default: python3)
  --dry-run          print the commands instead of running them [DRY_RUN=1]
  -h, --help         this text

Runs, each writing OUT/NAME.json and OUT/NAME.log:
  preflight          (with --topology) the training step's deviceless plan for that target
  vs_torch           train + sample, JAX vs PyTorch (alternating steps)
  train_dwconv_IMPL  the training step with dwconv_impl xla, shift, shift_vjp
  dwconv_study       the depthwise 7x7 conv alone (forward, backward, fused chain)
OUT/machine.txt holds the date, the commit, nvidia-smi and the package versions.

Example (flags after -- go to every bench run; --config.x=y overrides there are not given
to the preflight, whose plan is then refused if they change batch, dtype or remat):
  launch/gpu_bench.sh --out=runs/h200 --batch=256 --topology=1xh200 -- --repeats=10
EOF
}

OUT="${OUT:-runs/gpu_bench_$(date +%Y%m%d_%H%M%S)}"
CONFIG="${CONFIG:-configs/xl_256.py}"
BATCH="${BATCH:-32}"
DTYPE="${DTYPE:-bf16}"
REMAT="${REMAT:-block}"
IMPLS="${IMPLS:-xla,shift,shift_vjp}"
PYTHON="${PYTHON:-python3}"
TOPOLOGY="${TOPOLOGY:-}"
DRY_RUN="${DRY_RUN:-0}"
BENCH_FLAGS=()
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

die() { echo "gpu_bench.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out=*) OUT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --batch=*) BATCH="${1#*=}" ;;
    --dtype=*) DTYPE="${1#*=}" ;;
    --remat=*) REMAT="${1#*=}" ;;
    --impls=*) IMPLS="${1#*=}" ;;
    --topology=*) TOPOLOGY="${1#*=}" ;;
    --gpu=*) export CUDA_VISIBLE_DEVICES="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; BENCH_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[[ -f "$CONFIG" ]] || die "config $CONFIG not found (run from the repository root)"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "--batch must be a positive integer, got $BATCH"
case "$DTYPE" in bf16|fp32) ;; *) die "--dtype must be bf16 or fp32, got $DTYPE" ;; esac
IFS=, read -r -a impls <<< "$IMPLS"
for impl in "${impls[@]}"; do
  case "$impl" in xla|shift|shift_vjp) ;; *) die "unknown dwconv formulation: $impl" ;; esac
done

# JAX and PyTorch share the GPU in one process: JAX must not take 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# One bench run: NAME, then its flags; prints the command, logs to OUT/NAME.log.
bench() {
  local name="$1"; shift
  local cmd=("$PYTHON" -m fcdm_jax.bench --config="$CONFIG" --batch="$BATCH" --dtype="$DTYPE"
             --num_devices=1 "$@" --json="$OUT/$name.json"
             "${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"}")
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "${cmd[@]}" 2>&1 | tee "$OUT/$name.log"; fi
}

if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p "$OUT"
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "command: $0 $*"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    else
      echo "nvidia-smi: not found (no NVIDIA GPU: the runs use $PYTHON's default backend)"
    fi
    "$PYTHON" -c 'import jax, torch; print("jax", jax.__version__, jax.devices());
print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
fi

vs_preflight=()
if [[ -n "$TOPOLOGY" ]]; then
  model_dtype=bfloat16; [[ "$DTYPE" == fp32 ]] && model_dtype=float32
  cmd=("$PYTHON" -m fcdm_jax.preflight --config="$CONFIG" --topology="$TOPOLOGY"
       --batch="$BATCH" --programs=train --config.model.dtype="$model_dtype"
       --config.model.remat="$REMAT" --json="$OUT/preflight.json")
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "${cmd[@]}" 2>&1 | tee "$OUT/preflight.log"; fi
  vs_preflight=(--preflight_json="$OUT/preflight.json")
fi
bench vs_torch --mode=both --remat="$REMAT" --vs-torch "${vs_preflight[@]+"${vs_preflight[@]}"}"
for impl in "${impls[@]}"; do
  bench "train_dwconv_$impl" --mode=train --remat="$REMAT" --dwconv_impl="$impl"
done
bench dwconv_study --mode=dwconv
echo "gpu_bench.sh: results in $OUT"
