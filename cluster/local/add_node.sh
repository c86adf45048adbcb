#!/usr/bin/env bash
# Add a worker node to the local cluster that cluster/local/start.sh started: a second `ray start`
# on this machine, with its own CPUs and custom resources, as a cluster's node group would be
# (the streamed teacher's `teacher` resource, say). Recorded by name and pid, so that it can be
# stopped, or killed as a lost node is, alone (never a plain `ray stop`, which stops every Ray on
# the machine).
#
#   cluster/local/add_node.sh NAME [--cpus N] [--resources JSON]
#   cluster/local/add_node.sh teacher1 --cpus 2 --resources '{"teacher": 2}'
#   cluster/local/remove_node.sh teacher1          # SIGTERM: the node leaves
#   cluster/local/remove_node.sh teacher1 --kill   # SIGKILL of every process of the node: a node lost
#
# Settings: UTA_RAY_PORT (the head's GCS port, default 6379) and UTA_RAY_STATE_DIR, as for start.sh.
set -euo pipefail

die() { echo "add_node.sh: $*" >&2; exit 1; }

command -v ray >/dev/null \
  || die "the 'ray' command is not on PATH; activate the project's environment first (source scripts/env.sh)"
[ $# -ge 1 ] || die "usage: add_node.sh NAME [--cpus N] [--resources JSON]"
name="$1"; shift
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "NAME must be letters, digits, - or _, got '$name'"
cpus=1
resources='{}'
while [ $# -gt 0 ]; do
  case "$1" in
    --cpus) cpus="${2:?--cpus needs a number}"; shift 2 ;;
    --resources) resources="${2:?--resources needs a JSON object}"; shift 2 ;;
    *) die "unknown option '$1' (use --cpus N, --resources JSON)" ;;
  esac
done
[[ "$cpus" =~ ^[0-9]+$ ]] || die "--cpus must be a whole number, got '$cpus'"

port="${UTA_RAY_PORT:-6379}"
state_dir="${UTA_RAY_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/local-ray}"
head_pid_file="$state_dir/ray-head.pid"
[ -f "$head_pid_file" ] && kill -0 "$(cat "$head_pid_file")" 2>/dev/null \
  || die "no cluster of cluster/local/start.sh is running (no live pid in $head_pid_file); start one first"
mkdir -p "$state_dir/nodes"
pid_file="$state_dir/nodes/$name.pid"
log_file="$state_dir/nodes/$name.log"
if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  die "node '$name' is already running (pid $(cat "$pid_file")); remove it with cluster/local/remove_node.sh $name"
fi

export RAY_AUTH_MODE=token  # the head runs with token auth (start.sh); a node joins with the same token
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# --node-name: how this node shows in the dashboard and Ray's state API (the node's name).
nohup ray start --address "127.0.0.1:$port" --block --node-name "$name" \
  --num-cpus "$cpus" --num-gpus 0 --resources "$resources" \
  --dashboard-agent-listen-port 0 --disable-usage-stats >"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

# Joined when the head lists a live node of this name.
for _ in $(seq 1 90); do
  kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; tail -n 20 "$log_file" >&2; die "ray start exited early (log: $log_file)"; }
  if ray list nodes --address "127.0.0.1:$port" --filter "node_name=$name" --filter "state=ALIVE" 2>/dev/null \
      | grep -q "$name"; then
    echo "node '$name' joined (pid $pid, $cpus CPUs, resources $resources, log $log_file)"
    exit 0
  fi
  sleep 1
done
die "node '$name' did not join within 90 s (log: $log_file)"
