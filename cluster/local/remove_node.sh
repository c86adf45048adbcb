#!/usr/bin/env bash
# Remove a node that cluster/local/add_node.sh added, and only that one.
#   cluster/local/remove_node.sh NAME          # SIGTERM (cluster/local/stop.sh --node NAME): the node leaves
#   cluster/local/remove_node.sh NAME --kill   # SIGKILL of the node's every process (its raylet, its
#                                              # workers, its agents): what a lost machine looks like
set -euo pipefail

die() { echo "remove_node.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: remove_node.sh NAME [--kill]"
name="$1"
kill_it="${2:-}"
state_dir="${UTA_RAY_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/local-ray}"
pid_file="$state_dir/nodes/$name.pid"
[ -f "$pid_file" ] || die "no node '$name' recorded in $state_dir/nodes"
pid="$(cat "$pid_file")"
kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; echo "remove_node.sh: node '$name' (pid $pid) had already exited"; exit 0; }

descendants() {  # every process under $1, deepest first
  local child
  for child in $(pgrep -P "$1" || true); do descendants "$child"; echo "$child"; done
}

if [ "$kill_it" = "--kill" ]; then
  procs="$(descendants "$pid") $pid"
  kill -STOP $procs 2>/dev/null || true  # freeze first: none of them can react (or respawn) before it dies
  kill -KILL $procs 2>/dev/null || true
  rm -f "$pid_file"
  echo "node '$name' killed (pids $procs)"
  exit 0
fi
[ -z "$kill_it" ] || die "unknown option '$kill_it' (use --kill)"
exec bash "$(dirname "$0")/stop.sh" --node "$name"  # SIGTERM, then wait for it: as the head is stopped
