#!/usr/bin/env bash
# Train a candidate built-in model on a rented GPU whose calls last at most ten minutes and whose machine may be
# taken back between calls. Run from the repository root on that machine:
#
#   [RESERVE=M] [RESUME_FROM=DIR] bash benchmarks/rented_gpu_candidate.sh start RECIPE MINUTES [NAME=VALUE ...]
#   bash benchmarks/rented_gpu_candidate.sh wait SECONDS [OUT]                       # later calls: wait, report
#
# `start` checks that everything the run imports is there (a missing package fails at once, not after the
# training), then starts `python -m dalle_app.training.candidate` in the background under runs/candidate/.
# `wait` waits up to SECONDS for it to end, prints the end of its log, and copies into OUT (default $OUT) what
# can be carried away: the packed model and results once done, else the float16 weights kept at every
# checkpoint, from which `candidate --resume-weights` (or an export on any machine) continues if the lease is lost:
# carry such a copy to the next machine and name it in RESUME_FROM (it then keeps the copy's recipe and steps).
set -u
cd "$(dirname "$0")/.."
run=runs/candidate
case "${1:-}" in
  start)
    recipe=$2 minutes=$3; shift 3
    mkdir -p "$run"
    rm -f "$run/finished"
    resume=""
    if [ -n "${RESUME_FROM:-}" ]; then
      rm -rf "$run/state" "$run/weights"; cp -r "$RESUME_FROM" "$run/weights"; chmod -R u+w "$run/weights"
      resume=--resume-weights
    fi
    if ! python3 -c "import dalle_app.manager, dalle_app.evaluate, dalle_app.training.candidate" > "$run/log" 2>&1; then
      echo "imports failed: carry the missing wheels"; cat "$run/log"; exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv > "$run/gpu.txt" 2>&1
    setsid nohup bash -c "python3 -m dalle_app.training.candidate --recipe $recipe --folder $run --minutes $minutes --reserve-minutes ${RESERVE:-2} $resume \
      --set num_workers=8 $* >> $run/log 2>&1; echo \"candidate rc=\$?\" >> $run/log; touch $run/finished" \
      > /dev/null 2>&1 < /dev/null &
    echo "started: $recipe for $minutes minutes, log in $run/log" ;;
  wait)
    seconds=$2 out=${3:-${OUT:-}}
    # a machine taken back between calls comes back bare: say so at once instead of waiting for nothing
    [ -f "$run/log" ] || { echo "no run here: this is a fresh machine, the last one was taken back"; exit 3; }
    end=$(( $(date +%s) + seconds ))
    while [ ! -f "$run/finished" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    tr '\r' '\n' < "$run/log" | grep -v '^\s*$' | tail -20
    if [ -n "$out" ]; then
      if [ -d "$run/pack" ]; then cp "$run"/pack/* "$out"/; elif [ -d "$run/weights" ]; then cp -r "$run/weights" "$out"/; fi
      ls -R "$out" | head -20
    fi ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
