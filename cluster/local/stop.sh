#!/usr/bin/env bash
# Stop the one-machine cluster that cluster/local/start.sh started, and only that one.
# SIGTERM makes `ray start --block` shut down every process of its node (with no drain wait: start.sh).
set -euo pipefail

die() { echo "stop.sh: $*" >&2; exit 1; }

state_dir="${UTA_RAY_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/local-ray}"
pid_file="$state_dir/ray-head.pid"

[ -f "$pid_file" ] || die "no cluster recorded in $pid_file (nothing started by cluster/local/start.sh is running)"
pid="$(cat "$pid_file")"
if ! kill -0 "$pid" 2>/dev/null; then
  rm -f "$pid_file"
  echo "stop.sh: the cluster (pid $pid) had already exited"
  exit 0
fi

kill -TERM "$pid"
for _ in $(seq 1 60); do
  kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; echo "Ray cluster (pid $pid) stopped."; exit 0; }
  sleep 1
done
die "the cluster (pid $pid) is still shutting down after 60 s; its log is $state_dir/ray-head.log"
