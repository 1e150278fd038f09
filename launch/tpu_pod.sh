#!/usr/bin/env bash
# Train FCDM on a Cloud TPU VM (one host or a whole pod slice) with one command:
# create the VM, put the code on every worker, install, run fcdm_jax.main on all workers
# at once (logs stream here), and delete the VM at the end, also on failure or Ctrl-C.
# The run writes to a gs:// workdir, so rerunning the same command after a preemption
# resumes from the last checkpoint on a fresh VM.
# Before anything is created, the config is compiled here for the requested slice
# (python -m fcdm_jax.preflight, needs libtpu: pip install -e ".[tpu]"); the script stops
# with the preflight's figures when the run would not fit in the chips' memory.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --workdir=gs://BUCKET/RUN [options] [-- fcdm_jax.main flags]

Options (each also read from the environment variable in brackets):
  --project=ID          GCP project [PROJECT] (default: gcloud's configured project)
  --zone=ZONE           TPU zone [ZONE] (default: us-central2-b)
  --accelerator=TYPE    TPU type, e.g. v4-8, v4-32, v5p-64 [ACCELERATOR] (default: v4-32)
  --name=NAME           TPU VM name [TPU_NAME] (default: fcdm-$USER)
  --version=RUNTIME     TPU software version [RUNTIME] (default: tpu-ubuntu2204-base)
  --config=FILE         config file, relative to the repo [CONFIG] (default: configs/xl_256.py)
  --workdir=gs://...    checkpoints, metrics and samples; must be on GCS [WORKDIR] (required)
  --code=SOURCE         'copy' to upload this checkout, or a git URL to clone [CODE] (default: copy)
  --ref=REF             branch or tag to clone when --code is a URL [GIT_REF] (default: main)
  --spot                create a Spot VM (cheaper, preemptible) [SPOT=1]
  --reuse               use an existing VM of that name instead of creating one [REUSE=1]
  --keep                do not delete the VM at the end [KEEP=1]
  --skip-preflight      create the VM without first compiling the config for the slice
                        here (fcdm_jax.preflight) [SKIP_PREFLIGHT=1]
  --dry-run             print the commands (the preflight's too) instead of running them
                        [DRY_RUN=1]
  -h, --help            this text

Flags after `--` go to fcdm_jax.main, e.g. -- --config.batch_size=512 --config.seed=1
(the --config.* ones go to the preflight too). The preflight runs with $PYTHON
(default: python3) from this checkout.

Example:
  launch/tpu_pod.sh --project=my-proj --zone=us-central2-b --accelerator=v4-32 \
    --config=configs/xl_256.py --workdir=gs://my-bucket/fcdm/xl_256 --spot
EOF
}

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
TPU_NAME="${TPU_NAME:-fcdm-${USER:-user}}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/xl_256.py}"
WORKDIR="${WORKDIR:-}"
CODE="${CODE:-copy}"
GIT_REF="${GIT_REF:-main}"
SPOT="${SPOT:-0}"
REUSE="${REUSE:-0}"
KEEP="${KEEP:-0}"
DRY_RUN="${DRY_RUN:-0}"
SKIP_PREFLIGHT="${SKIP_PREFLIGHT:-0}"
PYTHON="${PYTHON:-python3}"
MAIN_FLAGS=()

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --version=*) RUNTIME="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --code=*) CODE="${1#*=}" ;;
    --ref=*) GIT_REF="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --reuse) REUSE=1 ;;
    --keep) KEEP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-preflight) SKIP_PREFLIGHT=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

[[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path every worker can write)"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be on GCS (gs://...): the workers of a pod" \
  "share no disk, and checkpoints must survive the VM; got $WORKDIR"
if [[ "$CODE" == copy && ! -f "$REPO/$CONFIG" ]]; then
  die "config $CONFIG not found in $REPO"
fi
if [[ -z "$PROJECT" && "$DRY_RUN" != 1 ]]; then
  PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
fi
[[ -n "$PROJECT" ]] || die "--project is required (or set one with gcloud config set project)"

# Print a command (shell-quoted) and run it unless this is a dry run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

# Run a shell command on every worker of the VM (gcloud streams their output here).
on_all_workers() {
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

# Will it fit? Compile the run's programs for this slice here, before paying for it.
# Before the cleanup trap: a refusal must not delete a VM (--reuse) it never touched.
if [[ "$SKIP_PREFLIGHT" != 1 ]]; then
  [[ -f "$REPO/$CONFIG" ]] || die "the preflight compiles $CONFIG from this checkout, which" \
    "has no such file; pass --skip-preflight to create the VM without it"
  preflight=("$PYTHON" -m fcdm_jax.preflight --config="$CONFIG" --topology="$ACCELERATOR")
  for flag in "${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}"; do
    if [[ "$flag" == --config.* ]]; then preflight+=("$flag"); fi
  done
  status=0
  (cd "$REPO" && run "${preflight[@]}") || status=$?
  if [[ "$status" == 1 ]]; then
    die "$CONFIG does not fit on $ACCELERATOR (preflight figures above); change the" \
      "config (batch, remat, sharding) or the accelerator, or pass --skip-preflight"
  elif [[ "$status" != 0 ]]; then
    die "the preflight could not run (exit $status, see above); it needs libtpu:" \
      "pip install -e \".[tpu]\" (or pass --skip-preflight)"
  fi
fi

tarball=""
cleanup() {
  local status=$?
  if [[ -n "$tarball" ]]; then rm -f "$tarball"; fi
  if [[ "$KEEP" == 1 ]]; then
    echo "tpu_pod.sh: keeping $TPU_NAME (delete it with: ${TPU[*]} delete $TPU_NAME" \
      "--project=$PROJECT --zone=$ZONE)" >&2
  else
    run "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ "$REUSE" != 1 ]]; then
  create=("${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR"
          --version="$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
fi

# The code, identical on every worker.
if [[ "$CODE" == copy ]]; then
  tarball="$(mktemp "${TMPDIR:-/tmp}/fcdm_jax.XXXXXX")"
  run tar -czf "$tarball" -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude='*.egg-info' --exclude=__pycache__ .
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:fcdm_jax.tgz" "${WHERE[@]}" --worker=all
  on_all_workers "rm -rf ~/fcdm_jax && mkdir -p ~/fcdm_jax && tar -xzf ~/fcdm_jax.tgz -C ~/fcdm_jax"
else
  on_all_workers "rm -rf ~/fcdm_jax && git clone --depth=1 --branch=$(printf %q "$GIT_REF") \
$(printf %q "$CODE") ~/fcdm_jax"
fi

# Install into a virtual environment: the package and JAX's TPU build (libtpu from PyPI),
# through the package's tpu extra: the jax and libtpu the preflight compiled with.
on_all_workers "python3 -m venv ~/venv && ~/venv/bin/pip install -q --upgrade pip && \
~/venv/bin/pip install -q -e \"\$HOME/fcdm_jax[tpu]\""

# Train on all workers at once: every worker runs the same command; jax.distributed
# finds its peers from the TPU metadata, and host 0 logs and writes.
printf -v main_args ' %q' --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=True \
  "${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}"
on_all_workers "cd ~/fcdm_jax && TF_CPP_MIN_LOG_LEVEL=2 \
~/venv/bin/python -m fcdm_jax.main${main_args}"
