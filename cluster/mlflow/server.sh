#!/usr/bin/env bash
# MLflow tracking server for multi-node runs: runs and metrics in a database, artefacts in
# S3, proxied by this server (clients upload through it, so Ray workers need no S3 rights
# for artefacts). Used as the container command of cluster/mlflow/mlflow.yaml, or run by
# hand on a machine every Ray node can reach (e.g. the AWS head node; cluster/README.md).
#
# Required (environment):
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER@HOST:5432/DB (or mysql://...), best without
#                                 the password (below); with one, keep it in a secret store
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix; S3 access from the machine's IAM role
# The database password (never on a command line, where every user of the machine sees it):
#   MLFLOW_DB_PASSWORD_FILE       a file holding it (a mounted Secret, mode 600), or
#   MLFLOW_DB_PASSWORD            the password itself, or in MLFLOW_BACKEND_STORE_URI
# Optional:
#   MLFLOW_HOST (127.0.0.1)       the address to listen on: this machine only unless you say
#                                 otherwise (0.0.0.0 in a pod behind its Service; the head's
#                                 private IP on AWS). The server has no login of its own:
#   MLFLOW_APP_NAME               basic-auth: MLflow's built-in login (users in its own database;
#                                 clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD),
#                                 or put an authenticating proxy in front (cluster/README.md)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers clients may use, comma-separated, * wildcards
#                                 (MLflow's default: localhost and private IPs only, so a
#                                 DNS name such as the k8s Service "mlflow:5000" must be listed)
#   MLFLOW_PORT (5000)  MLFLOW_WORKERS (4)
# Jobs find the server through MLFLOW_TRACKING_URI=http://<host>:<port>.
set -euo pipefail

die() { echo "server.sh: $*" >&2; exit 1; }

backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
[ -n "$backend" ] || die "MLFLOW_BACKEND_STORE_URI is not set; set it to the database URL, e.g. postgresql://user:password@host:5432/mlflow"
[ -n "$artifacts" ] || die "MLFLOW_ARTIFACTS_DESTINATION is not set; set it to the artefact store, e.g. s3://my-bucket/mlflow"
case "$backend" in
  postgresql://*|postgresql+*://*|mysql://*|mysql+*://*) ;;
  # Never echo the value: it holds the database password.
  *) die "MLFLOW_BACKEND_STORE_URI must be a postgresql:// or mysql:// URL: a shared server needs a database that outlives its host and takes concurrent writers, which SQLite and file stores are not" ;;
esac
case "$artifacts" in
  s3://?*) ;;
  *) die "MLFLOW_ARTIFACTS_DESTINATION must be an s3://bucket/prefix URI, got '$artifacts'" ;;
esac
# The password joins the URL in this process's environment only: mlflow reads the backend store from
# MLFLOW_BACKEND_STORE_URI itself, so it never appears in the server's command line (ps, /proc/*/cmdline).
password="${MLFLOW_DB_PASSWORD:-}"
if [ -n "${MLFLOW_DB_PASSWORD_FILE:-}" ]; then
  [ -r "$MLFLOW_DB_PASSWORD_FILE" ] || die "MLFLOW_DB_PASSWORD_FILE=$MLFLOW_DB_PASSWORD_FILE is not a readable file"
  password="$(head -n 1 "$MLFLOW_DB_PASSWORD_FILE")"
fi
if [ -n "$password" ]; then
  case "$backend" in
    *://*:*@*) die "MLFLOW_BACKEND_STORE_URI already holds a password; give it there or in MLFLOW_DB_PASSWORD(_FILE), not both" ;;
    *://*@*) ;;
    *) die "MLFLOW_BACKEND_STORE_URI names no user (scheme://USER@HOST/DB) for the password to go with" ;;
  esac
  encoded="$(python -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.stdin.read().rstrip("\n"), safe=""))' <<<"$password")"
  scheme="${backend%%://*}"; rest="${backend#*://}"
  backend="${scheme}://${rest%%@*}:${encoded}@${rest#*@}"
fi
export MLFLOW_BACKEND_STORE_URI="$backend" MLFLOW_ARTIFACTS_DESTINATION="$artifacts"
app=()
case "${MLFLOW_APP_NAME:-}" in
  "") ;;
  basic-auth) app=(--app-name basic-auth) ;;
  *) die "MLFLOW_APP_NAME must be basic-auth or unset, got '${MLFLOW_APP_NAME}'" ;;
esac
command -v mlflow >/dev/null || die "the 'mlflow' command is not on PATH; activate the project's environment (source scripts/env.sh)"
case "$backend" in
  postgresql*) python -c "import psycopg2" 2>/dev/null \
    || die "the PostgreSQL driver is missing; pip install psycopg2-binary (the project image has it)" ;;
  mysql*) python -c "import pymysql" 2>/dev/null || python -c "import MySQLdb" 2>/dev/null \
    || die "the MySQL driver is missing; pip install pymysql and use a mysql+pymysql:// URL" ;;
esac

# mlflow takes --backend-store-uri and --artifacts-destination from the variables exported above.
exec mlflow server \
  --serve-artifacts \
  "${app[@]}" \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
