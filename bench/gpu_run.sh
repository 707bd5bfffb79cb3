#!/usr/bin/env bash
# The GPU figures of the performance issue, in one command on a GPU machine that has no internet
# (its image has jax, flax, optax, orbax, chex and torch, but not ml_collections or clu).
#
#   bench/gpu_run.sh prepare       # here: wheels -> .whl/, reference sources -> .ref/ (both
#                                  # ignored through .git/info/exclude, never committed)
#   bench/gpu_run.sh run OUTDIR [PHASE ...]
#                                  # there (carry .whl and .ref): installs the wheels into
#                                  # /tmp/site, then runs the phases (default: all three, in
#                                  # this order, most important first) and writes into OUTDIR
#     bf16   compare_bf16.jsonl     ours bf16 vs the reference's AMP, in one run (the issue's targets)
#     train  train_step_bf16.jsonl  batch 64 bf16, every case: MFU, allocator peak, per-kernel
#                                   profile breakdown in each line (traces stay in /tmp)
#     fp32   compare_fp32.jsonl     ours fp32 (TF32) vs the reference fp32
#     minusface  (not in the default list; issue 15) the MinusFace demo on the GPU: stage 1
#            (configs/minusface.py:stage1,demo), then stage 2 on its generator with the margin-free
#            head and the 126-step schedule stretched MF_STRETCH times (default 40: 5,040 steps, LR
#            drop at 80%), evaluated every 504 steps; read through data.loader=numpy (the image has
#            no TensorFlow). Writes minusface_stage{1,2}_results.json, minusface_stage2_metrics.jsonl,
#            minusface_demo.jsonl (regeneration PSNR) and xp_grid.png
#   and log_<phase>.txt. One device call is limited to 10 minutes: if the three do not fit, run
#   one phase per call (the XLA compilation cache lives in /tmp and survives while the machine
#   stays warm).
#
# prepare needs: pip with internet access, ../shared/reference (ref_bench.py) and the reference
# snapshots named by TFACE_GIT / TORCHJPEG_GIT (git dirs, defaults: this workplace's mirrors).
# Environment for run: BATCH (64), STEPS (10), WARMUP (3), CASES (all), PYTHON (python3, with jax),
# REF_PYTHON (PYTHON, with torch), DEVICE (cuda; cpu only to try the plumbing on a small case).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(ml_collections==1.1.0 clu==0.0.12 dm_pix==0.4.5 google-crc32c==1.9.0 pillow==12.2.0)
TFACE_COMMIT=171ec1434aca0972e111663ac646c9c1e3e44b5b
TORCHJPEG_COMMIT=03e01c498d6a90d83e98bfb5e5575fa91ac0b8e1

die() { echo "gpu_run.sh: $*" >&2; exit 2; }

prepare() {
  local tface=${TFACE_GIT:-/work/.mirror/Tencent+TFace/repo}
  local tj=${TORCHJPEG_GIT:-/work/.mirror/Queuecumber+torchjpeg/repo}
  [ -f ../shared/reference/ref_bench.py ] || die "../shared/reference/ref_bench.py not found"
  [ -d "$tface" ] || die "TFace snapshot $tface not found (fetch github:Tencent/TFace, or set TFACE_GIT)"
  [ -d "$tj" ] || die "torchjpeg snapshot $tj not found (fetch github:Queuecumber/torchjpeg, or set TORCHJPEG_GIT)"
  for d in /.whl/ /.ref/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
  done
  rm -rf .whl .ref && mkdir -p .whl .ref/TFace .ref/torchjpeg
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
  cp ../shared/reference/ref_bench.py ../shared/reference/make_golden.py .ref/
  git -C "$tface" archive "$TFACE_COMMIT" recognition | tar -x -C .ref/TFace
  git -C "$tj" archive "$TORCHJPEG_COMMIT" src | tar -x -C .ref/torchjpeg
  echo "prepared: $(ls .whl | tr '\n' ' ')and .ref/ ($(du -sh .ref | cut -f1)); carry [\".whl\", \".ref\"]"
}

run() {
  local out=${1:?usage: bench/gpu_run.sh run OUTDIR [bf16|train|fp32 ...]}; shift
  local phases=("$@"); [ ${#phases[@]} -gt 0 ] || phases=(bf16 train fp32)
  local py=${PYTHON:-python3} device=${DEVICE:-cuda} batch=${BATCH:-64} steps=${STEPS:-10} warmup=${WARMUP:-3} cases=${CASES:-all}
  [ -d .whl ] && [ -f .ref/ref_bench.py ] || die ".whl/ or .ref/ missing: run 'bench/gpu_run.sh prepare' first and carry both"
  mkdir -p "$out"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  local ref=(--ref-python "${REF_PYTHON:-$py}" --ref-bench .ref/ref_bench.py --tface .ref/TFace --torchjpeg .ref/torchjpeg)
  local common=(--cases "$cases" --batch "$batch" --steps "$steps" --warmup "$warmup" --device "$device")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  for phase in "${phases[@]}"; do
    case "$phase" in
      bf16) "$py" bench/compare.py "${ref[@]}" "${common[@]}" --ours-args=--bf16 --ref-args=--amp \
              --out "$out/compare_bf16.jsonl" ;;
      train) "$py" bench/train_step.py --cases "$cases" --batch "$batch" --steps "$steps" --warmup "$warmup" \
               --bf16 --compile-cache /tmp/ppfr_bench_xla_cache --profile /tmp/ppfr_gpu_profile \
               --out "$out/train_step_bf16.jsonl" ;;
      fp32) "$py" bench/compare.py "${ref[@]}" "${common[@]}" --out "$out/compare_fp32.jsonl" ;;
      minusface) minusface "$py" "$out" ;;
      *) die "unknown phase '$phase' (bf16, train, fp32, minusface)" ;;
    esac 2>&1 | tee "$out/log_$phase.txt"
  done
}

minusface() {
  # MF_VARIANT=tiny MF_STRETCH=1 tries the plumbing in a minute (synthetic data, 4-step stages)
  local py=$1 out=$2 s1=/tmp/ppfr_mf_s1 s2=/tmp/ppfr_mf_s2 k=${MF_STRETCH:-40} v=${MF_VARIANT:-demo}
  local epochs drop every
  epochs=$(awk "BEGIN{print 3.0*$k}"); drop=$(awk "BEGIN{print 2.4*$k}"); every=$(( 126 * k / 10 ))
  [ "$every" -gt 0 ] || every=126
  "$py" -m ppfr_jax.main --config "configs/minusface.py:stage1,$v" --workdir "$s1" --config.data.loader=numpy
  "$py" -m ppfr_jax.main --config "configs/minusface.py:stage2,$v,stage1_workdir=$s1" --workdir "$s2" \
    --config.data.loader=numpy --config.head.margin=0.0 --config.optim.warmup_epochs=0.3 \
    --config.num_epochs="$epochs" --config.optim.boundaries_epochs="($drop,)" \
    --config.eval.every_steps="$every" --config.checkpoint_every_steps="$every"
  cp "$s1/results.json" "$out/minusface_stage1_results.json"
  cp "$s2/results.json" "$out/minusface_stage2_results.json"
  cp "$s2/metrics.jsonl" "$out/minusface_stage2_metrics.jsonl" 2>/dev/null || true
  "$py" bench/minusface_demo.py --stage1 "$s1" --stage2 "$s2" --out "$out" --images 500 \
    | tee "$out/minusface_demo.jsonl"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) die "usage: bench/gpu_run.sh prepare | run OUTDIR" ;;
esac
