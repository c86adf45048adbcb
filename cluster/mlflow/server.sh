#!/usr/bin/env bash
# MLflow tracking server for multi-node runs: runs and metrics in a database, artefacts in
# S3, proxied by this server (clients upload through it, so Ray workers need no S3 rights
# for artefacts). Used as the container command of cluster/mlflow/mlflow.yaml, or run by
# hand on a machine every Ray node can reach (e.g. the AWS head node; cluster/README.md).
#
# Required (environment):
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/DB (or mysql://...);
#                                 keep it in a secret store, it holds the DB password
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix; S3 access from the machine's IAM role
# Optional:
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers clients may use, comma-separated, * wildcards
#                                 (MLflow's default: localhost and private IPs only, so a
#                                 DNS name such as the k8s Service "mlflow:5000" must be listed)
#   MLFLOW_HOST (0.0.0.0)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (4)
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
command -v mlflow >/dev/null || die "the 'mlflow' command is not on PATH; activate the project's environment (source scripts/env.sh)"
case "$backend" in
  postgresql*) python -c "import psycopg2" 2>/dev/null \
    || die "the PostgreSQL driver is missing; pip install psycopg2-binary (the project image has it)" ;;
  mysql*) python -c "import pymysql" 2>/dev/null || python -c "import MySQLdb" 2>/dev/null \
    || die "the MySQL driver is missing; pip install pymysql and use a mysql+pymysql:// URL" ;;
esac

# --backend-store-uri and --artifacts-destination are also read by mlflow from the same
# variables; pass them explicitly so the command line says what the server does.
exec mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
