#!/usr/bin/env bash
# Stop the one-machine cluster that cluster/local/start.sh started, and only that one.
# SIGTERM makes `ray start --block` shut down every process of its node (with no drain wait: start.sh).
#   cluster/local/stop.sh               # the head, and with it the cluster
#   cluster/local/stop.sh --node NAME   # one node cluster/local/add_node.sh added (remove_node.sh NAME)
set -euo pipefail

die() { echo "stop.sh: $*" >&2; exit 1; }

state_dir="${UTA_RAY_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/local-ray}"
if [ "${1:-}" = --node ]; then
  name="${2:?--node needs a NAME}"
  pid_file="$state_dir/nodes/$name.pid" what="node '$name'" log_file="$state_dir/nodes/$name.log"
  stopped="node '$name'"
  [ -f "$pid_file" ] || die "no node '$name' recorded in $state_dir/nodes"
else
  [ $# -eq 0 ] || die "unknown option '$1' (use --node NAME)"
  pid_file="$state_dir/ray-head.pid" what="the cluster" log_file="$state_dir/ray-head.log"
  stopped="Ray cluster"
  [ -f "$pid_file" ] || die "no cluster recorded in $pid_file (nothing started by cluster/local/start.sh is running)"
fi
pid="$(cat "$pid_file")"
if ! kill -0 "$pid" 2>/dev/null; then
  rm -f "$pid_file"
  echo "stop.sh: $what (pid $pid) had already exited"
  exit 0
fi

kill -TERM "$pid"
for _ in $(seq 1 60); do
  kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; echo "$stopped (pid $pid) stopped."; exit 0; }
  sleep 1
done
die "$what (pid $pid) is still shutting down after 60 s; its log is $log_file"
