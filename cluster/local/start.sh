#!/usr/bin/env bash
# Start a one-machine Ray cluster for this project and print how to submit jobs to it.
#   - dashboard and job API listen on 127.0.0.1 only: nothing on the network can reach them;
#   - token authentication is on (RAY_AUTH_MODE=token; the token lives in ~/.ray/auth_token,
#     or in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH if you set one), so other users of a shared
#     machine cannot submit code through the local port either;
#   - usage stats are off.
# The cluster runs as one `ray start --head --block` process whose pid is recorded, so
# cluster/local/stop.sh stops exactly this cluster (plain `ray stop` would also kill every
# other Ray process of every user on the machine, e.g. a test run's ray.init()).
#
# Settings, all optional (environment variables):
#   UTA_RAY_NUM_CPUS        logical CPUs to advertise   (default: the larger of nproc and 4)
#   UTA_RAY_NUM_GPUS        GPUs to advertise           (default: what Ray detects)
#   UTA_RAY_PORT            GCS port                    (default: 6379)
#   UTA_RAY_DASHBOARD_PORT  dashboard + job API port    (default: 8265)
#   UTA_RAY_CLIENT_PORT     Ray Client server port      (default: 10001)
#   UTA_RAY_STATE_DIR       pid and log files           (default: ~/.cache/uta-pipelines/local-ray)
#
# Why at least 4 logical CPUs: Ray schedules by logical CPUs, not by cores. Each Ray Train
# worker holds one CPU for the whole run (a sweep adds one per Tune trial driver) and Ray
# Data needs free CPUs next to them for its read/decode tasks; on a 2-core machine a
# 2-CPU cluster lets the trainer take every slot and the input pipeline waits forever.
# Advertising more logical CPUs than cores costs speed, never correctness. On a bigger
# machine keep at least (training workers + 2) CPUs; the default uses every core.
set -euo pipefail

die() { echo "start.sh: $*" >&2; exit 1; }

command -v ray >/dev/null \
  || die "the 'ray' command is not on PATH; activate the project's environment first (source scripts/env.sh)"

cores="$(nproc)"
num_cpus="${UTA_RAY_NUM_CPUS:-$(( cores > 4 ? cores : 4 ))}"
port="${UTA_RAY_PORT:-6379}"
dash_port="${UTA_RAY_DASHBOARD_PORT:-8265}"
client_port="${UTA_RAY_CLIENT_PORT:-10001}"
state_dir="${UTA_RAY_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uta-pipelines/local-ray}"
pid_file="$state_dir/ray-head.pid"
log_file="$state_dir/ray-head.log"
[[ "$num_cpus" =~ ^[0-9]+$ && "$num_cpus" -ge 1 ]] || die "UTA_RAY_NUM_CPUS must be a positive integer, got '$num_cpus'"

mkdir -p "$state_dir"
if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  die "a cluster started by this script is already running (pid $(cat "$pid_file")); stop it with cluster/local/stop.sh"
fi
# A dashboard already answering on the port would pass the readiness check below as ours.
if (exec 3<>"/dev/tcp/127.0.0.1/$dash_port") 2>/dev/null; then
  die "port $dash_port is in use (another Ray dashboard?); stop that or set UTA_RAY_DASHBOARD_PORT"
fi

# Token auth, explicitly: Ray 2.60 turns it on for `ray start --head` by itself only when a
# token already exists (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]), and a client only sends the token when RAY_AUTH_MODE=token.
export RAY_AUTH_MODE=token
ray get-auth-token --generate >/dev/null 2>&1 || die "could not create a Ray auth token (ray get-auth-token --generate)"

# Stale Ray Data resource requests of a killed job expire after 30 s instead of 180 s, and
# Ray Train's controller looks at its workers every 0.5 s instead of 2 s (see RAY_PROCESS_ENV
# in pipelines/lib/ray_setup.py); every Ray process inherits these.
export RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S="${RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S:-30}"
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}"
# One machine has no other node to drain onto: on stop.sh's SIGTERM the node shuts down at once
# instead of waiting up to 30 s (Ray's default) for worker leases that ended jobs never return.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# The dashboard's Train view: Ray Train records every run's state (a sweep's trials are runs).
export RAY_TRAIN_ENABLE_STATE_TRACKING="${RAY_TRAIN_ENABLE_STATE_TRACKING:-1}"

gpu_args=()
[ -n "${UTA_RAY_NUM_GPUS:-}" ] && gpu_args=(--num-gpus "$UTA_RAY_NUM_GPUS")

# --dashboard-agent-listen-port 0: the agent that runs submitted jobs takes a free port.
# Ray's fixed default (52365) collides with any other Ray on the machine (a test's
# ray.init(), say); the agent then serves no HTTP and every submit fails with
# "No available agent to submit job".
nohup ray start --head --block \
  --port "$port" --ray-client-server-port "$client_port" \
  --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
  --dashboard-agent-listen-port 0 \
  --num-cpus "$num_cpus" "${gpu_args[@]}" \
  --disable-usage-stats >"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

# Ready when the job API answers; /api/authentication_mode needs no token.
for _ in $(seq 1 120); do
  kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; tail -n 30 "$log_file" >&2; die "ray start exited early (log above, full log: $log_file)"; }
  mode="$(curl -s --max-time 2 "http://127.0.0.1:$dash_port/api/authentication_mode" || true)"
  [ -n "$mode" ] && break
  sleep 1
done
[ -n "$mode" ] || die "the dashboard did not come up on 127.0.0.1:$dash_port within 2 minutes (log: $log_file)"
case "$mode" in
  *token*) ;;
  *) die "the cluster came up without token authentication ($mode); stop it with cluster/local/stop.sh" ;;
esac

cat <<MSG
Ray cluster running (pid $pid, $num_cpus CPUs, log $log_file).
  dashboard / job API: http://127.0.0.1:$dash_port  (token auth: the browser asks for the output of 'ray get-auth-token')
  Ray address for ray.init(): 127.0.0.1:$port

Submit a pipeline from the repository root (the client sends the token only when RAY_AUTH_MODE=token):
  export RAY_AUTH_MODE=token
  ray job submit --address http://127.0.0.1:$dash_port --working-dir . -- python pipelines/pretrain.py --smoke-test
(--smoke-test makes its own digits shards and tiny teacher in a temporary folder.) Your own shards:
the job runs in an uploaded copy of the checkout, which Ray deletes, so give inputs and outputs
absolute paths (or s3://), e.g.
  ray job submit --address http://127.0.0.1:$dash_port --working-dir . -- python pipelines/pretrain.py \
    --config configs/pretrain_local.yaml 'data.input.paths=/data/shards/*.tar' \
    run.storage_path=\$HOME/uta/runs tracking.tracking_uri=sqlite:///\$HOME/uta/mlflow.db
(cluster/README.md has the rest).

Stop the cluster:  cluster/local/stop.sh
MSG
