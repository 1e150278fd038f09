#!/usr/bin/env bash
# Train FCDM on all GPUs of this machine: one process that drives every local GPU
# (JAX's single-controller model), so no launcher or distributed setup is needed.
# Rerunning the same command on the same workdir resumes from the last checkpoint.
# Before training, the config is compiled for these GPUs (python -m fcdm_jax.preflight, the
# deviceless GPU compile) and the script stops with its figures if the run would not fit.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh --workdir=DIR [options] [-- fcdm_jax.main flags]

Options (each also read from the environment variable in brackets):
  --config=FILE      config file [CONFIG] (default: configs/xl_256.py)
  --workdir=DIR      checkpoints, metrics and samples (local path or gs://) [WORKDIR] (required)
  --gpus=LIST        GPUs to use, e.g. 0,1,2,3 [CUDA_VISIBLE_DEVICES] (default: all)
  --python=EXE       Python with fcdm_jax and jax[cuda12] installed [PYTHON] (default: python3)
  --accum=N          split each global batch into N micro-batches, one update per batch
                     (config.grad_accum_steps) [GRAD_ACCUM_STEPS] (default: the config's)
  --gpu-type=NAME    the GPU the preflight compiles for: 4090, l40s, a100-40gb, a100-80gb,
                     h100, h200 [GPU_TYPE] (default: from nvidia-smi)
  --skip-preflight   train without first compiling the config for these GPUs [SKIP_PREFLIGHT=1]
  --dry-run          print the commands instead of running them (the preflight's only with
                     --gpu-type and --gpus: a dry run asks nvidia-smi nothing) [DRY_RUN=1]
  -h, --help         this text

Flags after `--` go to fcdm_jax.main, e.g. -- --config.batch_size=128 (the --config.*
ones go to the preflight too). The preflight's answer for a setting that does not fit:
python -m fcdm_jax.preflight --config=FILE --topology=4x4090 --fit

Install once: pip install -e ".[gpu]" 'jax[cuda12]'
EOF
}

CONFIG="${CONFIG:-configs/xl_256.py}"
WORKDIR="${WORKDIR:-}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-}"
GPU_TYPE="${GPU_TYPE:-}"
SKIP_PREFLIGHT="${SKIP_PREFLIGHT:-0}"
MAIN_FLAGS=()

die() { echo "gpu_single_node.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --gpus=*) export CUDA_VISIBLE_DEVICES="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --accum=*) GRAD_ACCUM_STEPS="${1#*=}" ;;
    --gpu-type=*) GPU_TYPE="${1#*=}" ;;
    --skip-preflight) SKIP_PREFLIGHT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found (run from the repository root)"

if [[ -n "$GRAD_ACCUM_STEPS" ]]; then
  [[ "$GRAD_ACCUM_STEPS" =~ ^[1-9][0-9]*$ ]] || die "--accum must be a positive integer"
  MAIN_FLAGS=(--config.grad_accum_steps="$GRAD_ACCUM_STEPS" "${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}")
fi
cmd=("$PYTHON" -m fcdm_jax.main --config="$CONFIG" --workdir="$WORKDIR"
     "${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}")
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# The preflight's name of an nvidia-smi GPU name (empty: none of its targets).
gpu_type_of() {
  case "$1" in
    *4090*) echo 4090 ;;
    *L40S*) echo l40s ;;
    *A100*80GB*) echo a100-80gb ;;
    *A100*) echo a100-40gb ;;
    *H200*) echo h200 ;;
    *H100*) echo h100 ;;
  esac
}

if [[ "$DRY_RUN" != 1 ]]; then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
fi
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
  num_gpus="${#visible[@]}"
elif [[ "$DRY_RUN" != 1 ]]; then
  num_gpus="$(nvidia-smi -L | wc -l)"
else
  num_gpus=""
fi
if [[ -z "$GPU_TYPE" && "$DRY_RUN" != 1 ]]; then
  name="$(nvidia-smi --query-gpu=name --format=csv,noheader | awk 'NR == 1')"
  GPU_TYPE="$(gpu_type_of "$name")"
  if [[ -z "$GPU_TYPE" && "$SKIP_PREFLIGHT" != 1 ]]; then
    echo "gpu_single_node.sh: the preflight has no target for '$name'; training without it" \
      "(--gpu-type=NAME compiles for a similar GPU)" >&2
    SKIP_PREFLIGHT=1
  fi
fi

# Will it fit? Compile the run's training step for these GPUs before training.
if [[ "$SKIP_PREFLIGHT" != 1 && -n "$GPU_TYPE" && -n "$num_gpus" ]]; then
  preflight=("$PYTHON" -m fcdm_jax.preflight --config="$CONFIG" --topology="${num_gpus}x$GPU_TYPE"
             --programs=train)
  for flag in "${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}"; do
    if [[ "$flag" == --config.* ]]; then preflight+=("$flag"); fi
  done
  show "${preflight[@]}"
  if [[ "$DRY_RUN" != 1 ]]; then
    status=0
    "${preflight[@]}" || status=$?
    if [[ "$status" == 1 ]]; then
      die "$CONFIG does not fit on ${num_gpus}x$GPU_TYPE (preflight figures above); its" \
        "--fit flag prints settings that do (e.g. --accum), or pass --skip-preflight"
    elif [[ "$status" != 0 ]]; then
      die "the preflight could not run (exit $status, see above); it needs" \
        "pip install -e \".[gpu]\" (or pass --skip-preflight)"
    fi
  fi
fi
if [[ "$DRY_RUN" == 1 ]]; then
  show "${cmd[@]}"
  exit 0
fi

if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  die "$PYTHON's JAX sees no GPU: pip install 'jax[cuda12]' (and check CUDA_VISIBLE_DEVICES)"
fi

# Keep TensorFlow (imported by clu/tfds) off the GPUs and quiet; JAX owns the GPU memory.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export TF_FORCE_GPU_ALLOW_GROWTH=true
# exec: SIGTERM (preemption, `kill`) reaches the trainer itself, which checkpoints and exits.
exec "${cmd[@]}"
