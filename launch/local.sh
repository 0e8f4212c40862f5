#!/usr/bin/env bash
# Runs one jaxdiff command as N cooperating processes on this machine (JAX multi-controller,
# CPU collectives over gloo), e.g. to rehearse a multi-host run:
#
#   launch/local.sh 2 train --config configs/toy2d.py --workdir runs/toy2d-2proc
#
# Each process gets JAXDIFF_LOCAL_DEVICES fake CPU devices (default 1). Exit status: the first
# failing process's, else 0. `kill -TERM <this script>` rehearses a preemption. Python: $PYTHON,
# else the checkout's .venv/bin/python, else python3; it must be able to import jaxdiff.
set -euo pipefail
usage="usage: [PYTHON=/path/to/python] launch/local.sh N COMMAND [ARGS...]"
n=${1:-}
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: error: N=${n:-nothing} must be a positive number of processes; $usage" >&2
  exit 2
fi
shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[ -n "${PYTHON:-}" ] || [ -x "$python" ] || python=python3
# The chosen Python must find jaxdiff and its main dependencies (a cheap look-up, no import),
# else N processes would each fail with a traceback.
if ! "$python" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("jaxdiff", "jax", "flax", "absl", "ml_collections")))' \
    2>/dev/null; then
  echo "launch/local.sh: error: $python cannot import jaxdiff; point PYTHON at an environment" \
    "that has it, e.g. PYTHON=$here/.venv/bin/python launch/local.sh $n $*" >&2
  exit 2
fi
port=${JAXDIFF_PORT:-$((20000 + RANDOM % 20000))}
devices=${JAXDIFF_LOCAL_DEVICES:-1}
pids=()
for ((i = 0; i < n; i++)); do
  JAXDIFF_COORDINATOR="localhost:$port" JAXDIFF_NUM_PROCESSES="$n" JAXDIFF_PROCESS_ID="$i" \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "$python" -m jaxdiff.cli "$@" &
  pids+=($!)
done
# SIGTERM to this script is a preemption notice for every process: each finishes its step,
# they save one checkpoint together and exit 0. (Ctrl-C already reaches them all from the
# terminal.) A trap interrupts `wait`, so wait again until each process has really ended.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
trap ':' INT
status=0
for pid in "${pids[@]}"; do
  while :; do
    s=0; wait "$pid" || s=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$status" -ne 0 ] || status=$s
done
exit "$status"
