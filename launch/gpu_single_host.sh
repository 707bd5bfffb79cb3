#!/usr/bin/env bash
# Train on all GPUs of one machine: one process, jax sees every local GPU, and the engine's mesh
# spans them (data parallel backbone, class-sharded head).
#
#   launch/gpu_single_host.sh --config configs/arcface.py:ir50 --workdir runs/arcface_ir50
#   launch/gpu_single_host.sh --gpus 0,1,2,3 --config ... --workdir ... -- --config.half_precision=True
#   launch/gpu_single_host.sh --dry-run --config ... --workdir ...    # print the command only
#
# Environment it sets (an existing value wins, so export your own to override):
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90  share of each GPU's memory jax preallocates (jax's default
#                                        is 0.75; the class-sharded head and the backbone's
#                                        activations are the big users, see bench/RESULTS.md)
#   XLA_FLAGS += --xla_gpu_enable_latency_hiding_scheduler=true
#                                        lets XLA overlap the head's all-gather / reduce-scatter and
#                                        the gradient all-reduce with compute
#   CUDA_VISIBLE_DEVICES=<--gpus>        only when --gpus is given
# Run it from the repository root (config paths such as configs/arcface.py are relative; the
# package is importable from there even when not pip-installed).
# Multi-process variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, SLURM_NTASKS>1) are refused:
# with them set, the trainer would wait for peers that this script never starts.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_single_host.sh [options] [-- extra ppfr_jax.main flags]
  --config SPEC     trainer config [CONFIG] (default configs/arcface.py:ir50)
  --workdir DIR     run directory [WORKDIR] (required)
  --gpus LIST       comma-separated GPU indices (sets CUDA_VISIBLE_DEVICES; default: all)
  --python PYTHON   interpreter [PYTHON] (default python3)
  --dry-run         print the environment and command instead of running [DRY_RUN=1]
  -h, --help
EOF
}

die() { echo "gpu_single_host.sh: $*" >&2; echo "run 'launch/gpu_single_host.sh --help' for usage" >&2; exit 2; }

q() {
  local out="" a sq="'\\''"
  for a in "$@"; do
    if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/$sq}' "; fi
  done
  printf '%s\n' "${out% }"
}

CONFIG=${CONFIG:-configs/arcface.py:ir50}
WORKDIR=${WORKDIR:-}
PYTHON=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
GPUS=""
EXTRA=()
need() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --gpus) need "$@"; GPUS=$2; shift 2 ;;
    --python) need "$@"; PYTHON=$2; shift 2 ;;
    --config=*|--workdir=*|--gpus=*|--python=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n $WORKDIR ]] || die "--workdir (or WORKDIR) is required"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be comma-separated indices like 0,1,2,3, got '$GPUS'"
if [[ -n ${JAX_COORDINATOR_ADDRESS:-} || ${JAX_NUM_PROCESSES:-1} != 1 || ${SLURM_NTASKS:-1} != 1 ]]; then
  die "multi-process environment detected (JAX_COORDINATOR_ADDRESS='${JAX_COORDINATOR_ADDRESS:-}' JAX_NUM_PROCESSES='${JAX_NUM_PROCESSES:-}' SLURM_NTASKS='${SLURM_NTASKS:-}'); use launch/slurm_multihost.sbatch, or unset them"
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
if [[ " ${XLA_FLAGS:-} " != *"--xla_gpu_enable_latency_hiding_scheduler"* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
fi
[[ -n $GPUS ]] && export CUDA_VISIBLE_DEVICES=$GPUS
CMD=("$PYTHON" -m ppfr_jax.main --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}")

if [[ $DRY == 1 ]]; then
  for v in XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS CUDA_VISIBLE_DEVICES; do
    [[ -n ${!v:-} ]] && echo "export $(q "$v=${!v}")"
  done
  q "${CMD[@]}"
  exit 0
fi
exec "${CMD[@]}"
