#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install this repository on every worker, run
# `python3 -m ppfr_jax.main` on all workers at once, delete it.
#
#   launch/tpu_pod.sh --name my-tpu --zone us-central2-b --accelerator v4-32 \
#       --config configs/arcface.py:ir50 --workdir /gcs/my-bucket/runs/arcface_ir50 all
#   launch/tpu_pod.sh ... --dry-run all        # print every command, run nothing (no gcloud needed)
#   launch/tpu_pod.sh ... run -- --config.data.path=/gcs/my-bucket/ms1m --config.data.source=tfrecord
#
# Steps (one or more, in order): create | setup | run | delete | all (= create setup run delete;
# if run fails the TPU is left up for inspection and the script says how to delete it).
#
#   create  gcloud compute tpus tpu-vm create NAME --zone --accelerator-type --version [--spot]
#   setup   ships the code to every worker and pip-installs it there: by default a tarball of the
#           local git commit (`git archive REF`, REF=HEAD: commit first, uncommitted edits are not
#           shipped), copied with `tpu-vm scp --worker=all`; with --git-url, each worker clones it
#           instead. Then `pip install JAX_SPEC -e .` (JAX_SPEC defaults to 'jax[tpu]').
#   run     `tpu-vm ssh --worker=all` runs the trainer on every host of the slice. Each worker counts
#           the slice's hosts from the TPU metadata server and exports JAX_NUM_PROCESSES, which makes
#           ppfr_jax.train.maybe_initialize_distributed() call jax.distributed.initialize(); jax then
#           auto-detects coordinator, process id and count on Cloud TPU VMs. --detach runs it under
#           nohup (log: ~/ppfr_train.log on each worker) so closing the ssh session does not stop it.
#   delete  gcloud compute tpus tpu-vm delete NAME --zone --quiet
#
# The workdir must be a directory that every worker sees (each host writes its own checkpoint
# shards into it): a shared mount such as a GCS FUSE mount or a Filestore NFS share.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [options] STEP... [-- extra ppfr_jax.main flags]
  STEP: create | setup | run | delete | all
options (environment variable in brackets):
  --name NAME            TPU VM name                           [TPU_NAME]          (required)
  --zone ZONE            e.g. us-central2-b                    [ZONE]              (required)
  --accelerator TYPE     accelerator type, e.g. v4-32, v5p-32  [ACCELERATOR_TYPE]  (default v4-32)
  --version VERSION      TPU runtime version                   [RUNTIME_VERSION]   (default tpu-ubuntu2204-base)
  --project PROJECT      Google Cloud project                  [PROJECT]           (default: gcloud's)
  --config SPEC          trainer config                        [CONFIG]            (default configs/arcface.py:ir50)
  --workdir DIR          run directory shared by all workers   [WORKDIR]           (required for run)
  --git-url URL          setup: workers clone URL instead of receiving a tarball [GIT_URL]
  --ref REF              setup: git commit/branch to ship or clone [GIT_REF]   (default HEAD / default branch)
  --jax-spec SPEC        setup: pip requirement for jax        [JAX_SPEC]          (default 'jax[tpu]')
  --spot                 create: a Spot TPU
  --detach               run: nohup the trainer on each worker, log to ~/ppfr_train.log
  --dry-run              print the commands instead of running them   [DRY_RUN=1]
  -h, --help
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; echo "run 'launch/tpu_pod.sh --help' for usage" >&2; exit 2; }

# Print arguments as one shell-quoted line (copy-pasteable).
q() {
  local out="" a sq="'\\''"
  for a in "$@"; do
    if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/$sq}' "; fi
  done
  printf '%s\n' "${out% }"
}

NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
ACCEL=${ACCELERATOR_TYPE:-v4-32}
VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
CONFIG=${CONFIG:-configs/arcface.py:ir50}
WORKDIR=${WORKDIR:-}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
DRY=${DRY_RUN:-0}
SPOT=0
DETACH=0
STEPS=()
EXTRA=()

need() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need "$@"; NAME=$2; shift 2 ;;
    --zone) need "$@"; ZONE=$2; shift 2 ;;
    --accelerator) need "$@"; ACCEL=$2; shift 2 ;;
    --version) need "$@"; VERSION=$2; shift 2 ;;
    --project) need "$@"; PROJECT=$2; shift 2 ;;
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --git-url) need "$@"; GIT_URL=$2; shift 2 ;;
    --ref) need "$@"; GIT_REF=$2; shift 2 ;;
    --jax-spec) need "$@"; JAX_SPEC=$2; shift 2 ;;
    --name=*|--zone=*|--accelerator=*|--version=*|--project=*|--config=*|--workdir=*|--git-url=*|--ref=*|--jax-spec=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|setup|run|delete) STEPS+=("$1"); shift ;;
    all) STEPS+=(create setup run delete); shift ;;
    -*) die "unknown option $1" ;;
    *) die "unknown step '$1' (expected create, setup, run, delete or all)" ;;
  esac
done

[[ ${#STEPS[@]} -gt 0 ]] || { usage >&2; die "no step given (create, setup, run, delete or all)"; }
[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or ZONE) is required"
[[ " ${STEPS[*]} " == *" run "* && -z $WORKDIR ]] && die "step run needs --workdir (or WORKDIR)"
[[ $DETACH == 1 && " ${STEPS[*]} " == *" run "*"delete "* ]] && die "--detach with delete after run would delete the TPU under the running job"
if [[ $DRY != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH (install the Google Cloud CLI, or use --dry-run to print the commands)"
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GC=(gcloud compute tpus tpu-vm)
LOC=("--zone=$ZONE")
[[ -n $PROJECT ]] && LOC+=("--project=$PROJECT")
TARBALL=${TMPDIR:-/tmp}/ppfr_jax-src-$NAME.tar.gz
REMOTE_DIR=ppfr_jax  # relative to the worker's home directory, where ssh starts

doit() {  # run a command, or print it under --dry-run
  if [[ $DRY == 1 ]]; then q "$@"; else echo "+ $(q "$@")" >&2; "$@"; fi
}

step_create() {
  local cmd=("${GC[@]}" create "$NAME" "${LOC[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
  [[ $SPOT == 1 ]] && cmd+=(--spot)
  doit "${cmd[@]}"
}

step_setup() {
  local fetch
  if [[ -n $GIT_URL ]]; then
    local branch=()
    [[ -n $GIT_REF ]] && branch=(--branch "$GIT_REF")
    fetch="rm -rf $REMOTE_DIR && $(q git clone --depth 1 "${branch[@]}" "$GIT_URL" "$REMOTE_DIR")"
  else
    doit git -C "$REPO" archive --format=tar.gz -o "$TARBALL" "${GIT_REF:-HEAD}"
    doit "${GC[@]}" scp "$TARBALL" "$NAME:ppfr_jax-src.tar.gz" "${LOC[@]}" --worker=all
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf ppfr_jax-src.tar.gz -C $REMOTE_DIR"
  fi
  local remote="set -e; $fetch && cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q $(q "$JAX_SPEC") -e ."
  doit "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all "--command=$remote"
}

step_run() {
  # JAX_NUM_PROCESSES = number of hosts in the slice (metadata 'worker-network-endpoints' lists them)
  local count='n=$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints | awk -F, '"'"'{print NF}'"'"'); export JAX_NUM_PROCESSES=${n:-1}'
  local train
  train="python3 -m ppfr_jax.main $(q --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}")"
  if [[ $DETACH == 1 ]]; then
    train="nohup $train > ../ppfr_train.log 2>&1 < /dev/null &"
  fi
  doit "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all "--command=cd $REMOTE_DIR && $count && $train"
}

step_delete() {
  doit "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
}

for s in "${STEPS[@]}"; do
  if [[ $s == run && $DRY != 1 && " ${STEPS[*]} " == *" delete "* ]]; then
    step_run || { echo "tpu_pod.sh: run failed; the TPU $NAME is left up for inspection. Delete it with:" >&2
                  echo "  $(q "$0" --name "$NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} delete)" >&2; exit 1; }
  else
    "step_$s"
  fi
done
