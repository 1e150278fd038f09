#!/usr/bin/env bash
# Train FCDM on all GPUs of this machine: one process that drives every local GPU
# (JAX's single-controller model), so no launcher or distributed setup is needed.
# Rerunning the same command on the same workdir resumes from the last checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh --workdir=DIR [options] [-- fcdm_jax.main flags]

Options (each also read from the environment variable in brackets):
  --config=FILE      config file [CONFIG] (default: configs/xl_256.py)
  --workdir=DIR      checkpoints, metrics and samples (local path or gs://) [WORKDIR] (required)
  --gpus=LIST        GPUs to use, e.g. 0,1,2,3 [CUDA_VISIBLE_DEVICES] (default: all)
  --python=EXE       Python with fcdm_jax and jax[cuda12] installed [PYTHON] (default: python3)
  --dry-run          print the command instead of running it [DRY_RUN=1]
  -h, --help         this text

Flags after `--` go to fcdm_jax.main, e.g. -- --config.batch_size=128

Install once: pip install -e . 'jax[cuda12]'
EOF
}

CONFIG="${CONFIG:-configs/xl_256.py}"
WORKDIR="${WORKDIR:-}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
MAIN_FLAGS=()

die() { echo "gpu_single_node.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --gpus=*) export CUDA_VISIBLE_DEVICES="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found (run from the repository root)"

cmd=("$PYTHON" -m fcdm_jax.main --config="$CONFIG" --workdir="$WORKDIR"
     "${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  exit 0
fi

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  die "$PYTHON's JAX sees no GPU: pip install 'jax[cuda12]' (and check CUDA_VISIBLE_DEVICES)"
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

# Keep TensorFlow (imported by clu/tfds) off the GPUs and quiet; JAX owns the GPU memory.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export TF_FORCE_GPU_ALLOW_GROWTH=true
# exec: SIGTERM (preemption, `kill`) reaches the trainer itself, which checkpoints and exits.
exec "${cmd[@]}"
