#!/usr/bin/env bash
# bench/soak.sh — pgbench through pgwarden while the secret rotates in Secrets Manager (moto).
#
# For each strategy (single user, alternating users): pgbench -S for DURATION seconds without
# rotation (baseline), then again while `pgwarden rotate` runs the four rotation steps every
# INTERVAL seconds. Reports failed transactions (must be 0), TPS with and without rotation,
# rotations done, backend logins per rotation (DatabaseConnectionsSetupSucceeded), and the
# 99.9th percentile and worst transaction latency with and without rotation (pgbench -l).
# Then the same two runs with pgbench connected straight to PostgreSQL (its connections open
# before the rotations start, so they outlive every password change): what the rotations
# themselves (ALTER ROLE, the rotator's test logins, moto on the same cores) cost PostgreSQL and
# the machine, without pgwarden in the path. Unlike pgbench's, pgwarden's backends retire after
# a rotation and new ones log in: with the kernel's autogroup scheduling on (the default), each
# new PostgreSQL backend is a scheduling group of its own and may wait a second or more for a CPU
# on a busy 2-core machine (see bench/RESULTS.md); `sysctl kernel.sched_autogroup_enabled=0`
# before a run leaves pgwarden's own share.
#
# Environment: DURATION=60 INTERVAL=2 CLIENTS=16 POOL=10 SKIP_BUILD=0 KEEP_TMP=0
# Needs: PostgreSQL 15 server binaries, pgbench, python3 (moto[server] goes into bench/.venv-soak).
set -Eeuo pipefail

DURATION=${DURATION:-60}
INTERVAL=${INTERVAL:-2}
CLIENTS=${CLIENTS:-16}
POOL=${POOL:-10}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PGW=$REPO/target/dist/pgwarden
VENV=$BENCH_DIR/.venv-soak

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

TMP=$(mktemp -d /tmp/pgwarden-soak.XXXXXX)
PGW_PID="" MOTO_PID="" BENCH_PID=""
cleanup() {
  local rc=$?
  set +e
  [[ -n $BENCH_PID ]] && kill "$BENCH_PID" 2>/dev/null
  [[ -n $PGW_PID ]] && kill "$PGW_PID" 2>/dev/null
  [[ -n $MOTO_PID ]] && kill "$MOTO_PID" 2>/dev/null
  [[ -f $TMP/pgdata/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -m immediate stop >/dev/null 2>&1
  if (( rc != 0 )); then for f in "$TMP"/*.log; do echo "---- $f" >&2; tail -n 15 "$f" >&2; done; fi
  if [[ $KEEP_TMP == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT

if [[ $SKIP_BUILD != 1 ]]; then log "building pgwarden (scripts/build-dist.sh)"; "$REPO/scripts/build-dist.sh"; fi
if ! [[ -x $VENV/bin/moto_server ]]; then
  log "creating $VENV with moto[server]"
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]>=5.1,<6"
fi
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
export PGSSLMODE=disable

# ---- PostgreSQL
chmod 755 "$TMP"; [[ $(id -u) -eq 0 ]] && chown postgres: "$TMP"
PG_PORT=$(free_port); SUPER_PW=$(openssl rand -hex 16); APP_PW=$(openssl rand -hex 16); ALT_PW=$(openssl rand -hex 16)
printf '%s\n' "$SUPER_PW" >"$TMP/pw"; [[ $(id -u) -eq 0 ]] && chown postgres: "$TMP/pw"
as_pg "$PG_BIN/initdb" -D "$TMP/pgdata" -U postgres --auth=scram-sha-256 --pwfile="$TMP/pw" --no-sync >"$TMP/initdb.log" 2>&1
rm -f "$TMP/pw"
printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nmax_connections = 300\nfsync = off\nsynchronous_commit = off\n" \
  "$PG_PORT" "$TMP" >>"$TMP/pgdata/postgresql.conf"
as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -l "$TMP/postgres.log" -w start >/dev/null
psql_su() { PGPASSWORD=$SUPER_PW psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }
psql_su -d postgres -c "CREATE ROLE app LOGIN PASSWORD '$APP_PW'" -c "CREATE ROLE alt LOGIN PASSWORD '$ALT_PW'" \
  -c "CREATE DATABASE bench OWNER app"
PGPASSWORD=$APP_PW pgbench -q -i -s 5 -h 127.0.0.1 -p "$PG_PORT" -U app bench >"$TMP/init.log" 2>&1
psql_su -d bench -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO alt"

# ---- moto + secrets
MOTO_PORT=$(free_port)
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$TMP/moto.log" 2>&1 &
MOTO_PID=$!
ENDPOINT=http://127.0.0.1:$MOTO_PORT
for _ in {1..100}; do grep -q "Running on" "$TMP/moto.log" && break; sleep 0.2; done
py() { "$VENV/bin/python" -c "$1" "${@:2}"; }
py 'import boto3, json, sys
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1])
base = {"engine": "postgres", "host": "127.0.0.1", "port": int(sys.argv[2]), "dbname": "bench"}
master = sm.create_secret(Name="soak/master", SecretString=json.dumps(dict(base, username="postgres", password=sys.argv[3])))
sm.create_secret(Name="soak/single", SecretString=json.dumps(dict(base, username="app", password=sys.argv[4])))
sm.create_secret(Name="soak/alternating", SecretString=json.dumps(dict(base, username="alt", password=sys.argv[5], masterarn=master["ARN"])))' \
  "$ENDPOINT" "$PG_PORT" "$SUPER_PW" "$APP_PW" "$ALT_PW"
# current_login SECRET: "username password" of the secret's AWSCURRENT version.
current_login() {
  py 'import boto3, json, sys
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1])
s = json.loads(sm.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSCURRENT")["SecretString"])
print(s["username"], s["password"])' "$ENDPOINT" "$1"
}

# ---- pgwarden
PGW_PORT=$(free_port); METRICS_PORT=$(free_port)
cat >"$TMP/pgwarden.toml" <<TOML
listen = "127.0.0.1:$PGW_PORT"
[database]
host = "127.0.0.1"
port = $PG_PORT
dbname = "bench"
[pool]
max_backend_connections = $POOL
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
[audit]
output = "off"
[[credentials]]
user = "app"
source = "aws"
secret_id = "soak/single"
endpoint_url = "$ENDPOINT"
refresh_interval = "500ms"
[[credentials]]
user = "alt"
source = "aws"
secret_id = "soak/alternating"
endpoint_url = "$ENDPOINT"
refresh_interval = "500ms"
TOML
PGWARDEN_LOG=warn "$PGW" serve --config "$TMP/pgwarden.toml" >"$TMP/pgwarden.log" 2>&1 &
PGW_PID=$!
for _ in {1..100}; do PGPASSWORD=$APP_PW psql -X -h 127.0.0.1 -p "$PGW_PORT" -U app -d bench -tAc 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
logins() { curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | awk '$1 == "DatabaseConnectionsSetupSucceeded" {print $2}'; }

# run_pgbench PORT USER SECRET OUTFILE: pgbench -S to PORT (pgwarden or PostgreSQL) as USER (the
# secret's current username if USER is empty: after an alternating rotation that is the clone),
# with the current password, logging every transaction to OUTFILE.log.*.
run_pgbench() {
  local login pw user
  read -r login pw < <(current_login "$3")
  user=${2:-$login}
  PGPASSWORD=$pw pgbench -n -S -c "$CLIENTS" -j 2 -T "$DURATION" -l --log-prefix="$4.log" \
    -h 127.0.0.1 -p "$1" -U "$user" bench >"$4" 2>&1
}
# The 99.9th percentile and the worst transaction latency (ms) of a run_pgbench log.
tail_latency() { cat "$1".log.* | awk '{print $3}' | sort -n | awk '{v[NR] = $1} END {printf "%.1f / %.1f", v[int(NR * 0.999)] / 1000, v[NR] / 1000}'; }
field() { sed -n "s/^$1 = \([0-9.]*\).*/\1/p; s/^$1: \([0-9]*\).*/\1/p" "$2" | head -1; }

REPORT=$TMP/report.md
{
  echo "## pgwarden rotation soak — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- pgwarden $(git -C "$REPO" describe --always --dirty), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)')"
  echo "- kernel $(uname -r), scheduler autogroup $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo n/a) (each PostgreSQL backend is a session of its own: with autogroup on, a newly forked one can wait for a CPU for a second or more on a busy 2-core machine)"
  echo "- pgbench -S -c $CLIENTS -j 2 -T $DURATION through pgwarden (pool $POOL), then straight to PostgreSQL; \`pgwarden rotate\` every $INTERVAL s; credential refresh every 500 ms"
  echo
  echo "| strategy | pgbench to | TPS without rotation | TPS during rotation | ratio | rotations | failed tx (with / without) | backend logins per rotation | p99.9 / worst latency without rotation (ms) | p99.9 / worst during rotation (ms) |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
} >"$REPORT"

for run in single:pgwarden alternating:pgwarden single:direct alternating:direct; do
  strategy=${run%:*} target=${run#*:}
  user=app; [[ $strategy == alternating ]] && user=alt
  port=$PGW_PORT
  if [[ $target == direct ]]; then port=$PG_PORT user=""; fi
  name=$TMP/$strategy-$target
  log "$strategy, $target: baseline, ${DURATION}s without rotation"
  run_pgbench "$port" "$user" "soak/$strategy" "$name-base.txt"
  log "$strategy, $target: ${DURATION}s with a rotation every ${INTERVAL}s"
  logins0=$(logins)
  run_pgbench "$port" "$user" "soak/$strategy" "$name-rot.txt" &
  BENCH_PID=$!
  rotations=0 rotation_errors=0
  while kill -0 "$BENCH_PID" 2>/dev/null; do
    sleep "$INTERVAL"
    kill -0 "$BENCH_PID" 2>/dev/null || break
    if "$PGW" rotate --secret-id "soak/$strategy" --strategy "$strategy" --endpoint-url "$ENDPOINT" >>"$TMP/rotate.log" 2>&1; then
      rotations=$((rotations + 1))
    else
      rotation_errors=$((rotation_errors + 1))
    fi
  done
  wait "$BENCH_PID" || true
  BENCH_PID=""
  logins1=$(logins)
  base_tps=$(field tps "$name-base.txt"); rot_tps=$(field tps "$name-rot.txt")
  base_fail=$(field "number of failed transactions" "$name-base.txt"); rot_fail=$(field "number of failed transactions" "$name-rot.txt")
  per=$(awk -v a="$logins0" -v b="$logins1" -v r="$rotations" 'BEGIN { if (r > 0) printf "%.2f", (b - a) / r; else print "n/a" }')
  if [[ $target == direct ]]; then per="-"; fi
  ratio=$(awk -v a="$rot_tps" -v b="$base_tps" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')
  printf '| %s | %s | %.0f | %.0f | %s | %s (%s failed) | %s / %s | %s | %s | %s |\n' "$strategy" "$target" "$base_tps" "$rot_tps" \
    "$ratio" "$rotations" "$rotation_errors" "${rot_fail:-?}" "${base_fail:-?}" "$per" \
    "$(tail_latency "$name-base.txt")" "$(tail_latency "$name-rot.txt")" >>"$REPORT"
  grep -q "aborted\|error" "$name-rot.txt" && { echo "pgbench reported errors:" >&2; grep -m5 "aborted\|error" "$name-rot.txt" >&2; }
done
echo >>"$REPORT"
cat "$REPORT"
mkdir -p "$BENCH_DIR/out" && cp "$REPORT" "$BENCH_DIR/out/soak-latest.md"
