#!/usr/bin/env bash
# bench/run.sh — pgwarden vs PgBouncer vs direct PostgreSQL, on this machine.
#
# Usage:
#   bench/run.sh          # tps workloads, then idle-client memory (= "all")
#   bench/run.sh tps      # pgbench workloads only
#   bench/run.sh idle     # idle-client memory only
#   bench/run.sh cold     # cold pools: first transactions' latency while the pool fills
#
# Environment overrides:
#   DURATION=15        seconds per pgbench run
#   ROUNDS=3           runs per (workload, system), interleaved across systems;
#                      the table reports the median round (by TPS)
#   POOL=20            backend pool size (PgBouncer default_pool_size,
#                      pgwarden max_backend_connections)
#   IDLE_CLIENTS=5000  idle connections opened for the memory measurement
#   SYSTEMS="direct pgbouncer pgwarden"   subset to run (idle skips "direct")
#   WORKLOADS="select32 select300 tpcb32 extended32 connect32 burst32"  subset (default);
#                      also prepared32 (-M prepared: named statements, which PgBouncer
#                      carries in transaction mode only from 1.21, with max_prepared_statements)
#   SKIP_BUILD=1       do not run scripts/build-dist.sh (use the existing binary)
#   PGW_WORKERS=N      pgwarden worker_threads (default: pgwarden's own default)
#   KEEP_TMP=1         keep the temp dir (logs, configs) after exit
#
# What it does, in one run:
#   1. scripts/build-dist.sh: the shipped build, profile-guided (if pgwarden is in SYSTEMS)
#   2. installs pgbouncer with apt-get if missing
#   3. starts a throwaway PostgreSQL 15 (scram-sha-256, fsync=off, ...) as the
#      `postgres` OS user, creates role+db `bench`, pgbench -i -s 10
#   4. starts PgBouncer (transaction pooling) and pgwarden on free ports; all three
#      offer TLS with the same P-256 certificate (used by the burst32 workload only;
#      there pgwarden's clients log in with an IAM auth token, the others with SCRAM)
#   5. runs pgbench workloads against each system and prints TPS / mean
#      latency / failed transactions plus pgwarden ratios
#   6. cold pools: restarts each pooler (so its pool is empty) and runs 32 select-only
#      clients for 3 s with per-transaction logs: the worst latency of the transactions
#      started in the first 0.2 s (while the pool fills), and how many took over 100 ms
#   7. opens IDLE_CLIENTS idle SCRAM-authenticated clients (bench/idle_clients.py,
#      asyncpg in a venv) to each pooler and reports VmRSS growth per client
#   Results go to stdout and bench/out/latest.md (+ a timestamped copy and raw
#   pgbench output under bench/out/raw/). Everything is torn down on exit.

set -Eeuo pipefail

MODE=${1:-all}
case "$MODE" in
  all|tps|idle|cold) ;;
  -h|--help|help) sed -n '2,34p' "$0"; exit 0 ;;
  *) echo "usage: $0 [all|tps|idle|cold]" >&2; exit 2 ;;
esac

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
POOL=${POOL:-20}
IDLE_CLIENTS=${IDLE_CLIENTS:-5000}
SYSTEMS=${SYSTEMS:-"direct pgbouncer pgwarden"}
WORKLOADS=${WORKLOADS:-"select32 select300 tpcb32 extended32 connect32 burst32"}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
OUT_DIR=$BENCH_DIR/out
PG_BIN=/usr/lib/postgresql/15/bin
PGWARDEN_BIN=${PGWARDEN_BIN:-$REPO/target/dist/pgwarden}   # override only for testing the harness

# ---------------------------------------------------------------- helpers --
log()  { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }
has()  { [[ " $SYSTEMS " == *" $1 "* ]]; }

# Raise the fd limit: 300 pgbench clients, 5000 idle clients, and the servers
# (which inherit it) all need far more than 1024. The hard limit may be lower
# than 65536 in containers; take what we can get.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
if [[ " $WORKLOADS " == *" select300 "* ]] && (( DURATION < 10 )) && [[ $MODE != idle ]]; then
  warn "DURATION=$DURATION: pgbench's -T clock includes connecting 300 SCRAM clients (seconds through a pooler); select300 may process 0 transactions"
fi
if (( NOFILE < IDLE_CLIENTS + 200 )); then
  warn "ulimit -n is $NOFILE; idle test with $IDLE_CLIENTS clients may fail"
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
rand_pw() { openssl rand -hex 16; }

# Run a command as the postgres OS user when we are root (PostgreSQL and
# PgBouncer both refuse to run as root). runuser goes through pam_limits, which
# resets the soft fd limit to 1024, so re-raise it inside.
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- bash -c 'ulimit -n "$0" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"' "$NOFILE" "$@"
  else
    "$@"
  fi
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wait_sql PORT USER PASSWORD DB WHAT [PID] — poll `select 1`, bounded (~30 s).
wait_sql() {
  local port=$1 user=$2 pw=$3 db=$4 what=$5 pid=${6:-} i
  for ((i = 0; i < 60; i++)); do
    if PGPASSWORD=$pw PGCONNECT_TIMEOUT=2 timeout 5 \
        psql -X -q -h 127.0.0.1 -p "$port" -U "$user" -d "$db" -tAc 'select 1' >/dev/null 2>&1; then
      return 0
    fi
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      die "$what exited during startup"
    fi
    sleep 0.5
  done
  die "$what did not accept connections on port $port within 30 s"
}

# ------------------------------------------------------------ cleanup trap --
TMP=""
PGDATA=""
PGB_PID=""
PGW_PID=""
IDLE_PID=""
BENCH_PID=""

# stop_pid PID — SIGTERM (PgBouncer: immediate shutdown; pgwarden: drain), SIGKILL after 5 s.
stop_pid() {
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in {1..50}; do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null
  return 0
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $BENCH_PID ]]; then kill "$BENCH_PID" 2>/dev/null; wait "$BENCH_PID" 2>/dev/null; fi
  if [[ -n $IDLE_PID ]]; then kill "$IDLE_PID" 2>/dev/null; wait "$IDLE_PID" 2>/dev/null; fi
  stop_pid "$PGW_PID"
  stop_pid "$PGB_PID"
  if [[ -n $PGDATA && -f $PGDATA/postmaster.pid ]]; then
    as_pg timeout 40 "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -t 30 stop >/dev/null 2>&1
  fi
  if (( rc != 0 )) && [[ -n $TMP ]]; then
    for f in "$TMP"/postgres.log "$TMP"/pgbouncer.log "$TMP"/pgwarden.log "$TMP"/idle.err; do
      if [[ -s $f ]]; then echo "---- tail $f" >&2; tail -n 20 "$f" >&2; fi
    done
  fi
  if [[ -n $TMP && -d $TMP ]]; then
    if [[ $KEEP_TMP == 1 ]]; then echo "temp dir kept: $TMP" >&2; else rm -rf "$TMP"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ build --
if has pgwarden; then
  if [[ $SKIP_BUILD != 1 ]]; then
    log "building pgwarden (scripts/build-dist.sh: dist profile, profile-guided)"
    "$REPO/scripts/build-dist.sh"
  fi
  [[ -x $PGWARDEN_BIN ]] || die "$PGWARDEN_BIN not found"
fi

# ------------------------------------------------------- tool installation --
if has pgbouncer && ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then
  log "installing pgbouncer"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
PGBOUNCER_BIN=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

PY=""
if [[ $MODE == all || $MODE == idle ]]; then
  if [[ -x $REPO/.venv/bin/python ]] && "$REPO/.venv/bin/python" -c 'import asyncpg' 2>/dev/null; then
    PY=$REPO/.venv/bin/python
  else
    PY=$BENCH_DIR/.venv/bin/python
    if ! { [[ -x $PY ]] && "$PY" -c 'import asyncpg' 2>/dev/null; }; then
      log "creating bench/.venv with asyncpg"
      python3 -m venv "$BENCH_DIR/.venv"
      "$PY" -m pip install -q --disable-pip-version-check asyncpg
    fi
  fi
fi

# ---------------------------------------------------------------- postgres --
TMP=$(mktemp -d /tmp/pgwarden-bench.XXXXXX)
chmod 755 "$TMP"
if [[ $(id -u) -eq 0 ]]; then chown postgres: "$TMP"; fi
PGDATA=$TMP/pgdata
PG_PORT=$(free_port)
SUPER_PW=$(rand_pw)
BENCH_PW=$(rand_pw)

# Clients: plain TCP, no SSLRequest/GSSENCRequest preamble (same for all systems).
export PGSSLMODE=disable PGGSSENCMODE=disable

log "starting PostgreSQL on 127.0.0.1:$PG_PORT (temp dir $TMP)"
printf '%s\n' "$SUPER_PW" > "$TMP/superpw"
if [[ $(id -u) -eq 0 ]]; then chown postgres: "$TMP/superpw"; fi
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=scram-sha-256 \
  --pwfile="$TMP/superpw" -E UTF8 --no-sync >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
rm -f "$TMP/superpw"
cat >>"$PGDATA/postgresql.conf" <<EOF

# --- pgwarden bench ---
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
max_connections = 400
fsync = off
synchronous_commit = off
shared_buffers = 128MB
ssl = on
ssl_cert_file = '$TMP/tls.crt'
ssl_key_file = '$TMP/tls.key'
EOF
# One P-256 certificate for every system's client-facing TLS (the burst32 workload).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$TMP/tls.key" -out "$TMP/tls.crt" -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1 || die "openssl could not make a certificate"
chmod 600 "$TMP/tls.key"
if [[ $(id -u) -eq 0 ]]; then chown postgres: "$TMP/tls.key" "$TMP/tls.crt"; fi
as_pg timeout 90 "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$TMP/postgres.log" -w -t 60 start >/dev/null \
  || die "pg_ctl start failed"
wait_sql "$PG_PORT" postgres "$SUPER_PW" postgres PostgreSQL

PGPASSWORD=$SUPER_PW psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres <<EOF
CREATE ROLE bench LOGIN PASSWORD '$BENCH_PW';
CREATE DATABASE bench OWNER bench;
EOF
log "pgbench -i -s 10"
PGPASSWORD=$BENCH_PW timeout 600 pgbench -i -s 10 -h 127.0.0.1 -p "$PG_PORT" -U bench bench \
  >"$TMP/pgbench-init.log" 2>&1 || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }
PGPASSWORD=$SUPER_PW psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench -c 'CHECKPOINT' >/dev/null

# --------------------------------------------------------------- pgbouncer --
start_pgbouncer() {
  rm -f "$TMP/pgbouncer.pid"
  as_pg "$PGBOUNCER_BIN" -d "$TMP/pgbouncer.ini" || die "pgbouncer failed to start"
  for _ in {1..50}; do [[ -s $TMP/pgbouncer.pid ]] && break; sleep 0.1; done
  PGB_PID=$(cat "$TMP/pgbouncer.pid" 2>/dev/null) || die "no pgbouncer pidfile"
  wait_sql "$PGB_PORT" bench "$BENCH_PW" bench PgBouncer "$PGB_PID"
}

PGB_PORT=""
if has pgbouncer; then
  PGB_PORT=$(free_port)
  MAX_CLIENT=$(( IDLE_CLIENTS + 1000 > 6000 ? IDLE_CLIENTS + 1000 : 6000 ))
  log "starting PgBouncer $("$PGBOUNCER_BIN" --version | head -1 | awk '{print $2}') on 127.0.0.1:$PGB_PORT (pool $POOL)"
  printf '"bench" "%s"\n' "$BENCH_PW" >"$TMP/userlist.txt"
  cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = $MAX_CLIENT
ignore_startup_parameters = extra_float_digits
logfile = $TMP/pgbouncer.log
pidfile = $TMP/pgbouncer.pid
log_connections = 0
log_disconnections = 0
client_tls_sslmode = allow
client_tls_cert_file = $TMP/tls.crt
client_tls_key_file = $TMP/tls.key
EOF
  # PgBouncer carries named prepared statements in transaction mode from 1.21 (as pgwarden does
  # with its default max_prepared_statements = 200); older ones refuse the key.
  PGB_VERSION=$("$PGBOUNCER_BIN" --version | head -1 | awk '{print $2}')
  if [[ $(printf '%s\n1.21\n' "$PGB_VERSION" | sort -V | head -1) == 1.21 ]]; then
    echo "max_prepared_statements = 200" >>"$TMP/pgbouncer.ini"
  fi
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$TMP/userlist.txt" "$TMP/pgbouncer.ini"
  fi
  chmod 600 "$TMP/userlist.txt"
  start_pgbouncer
fi

# ---------------------------------------------------------------- pgwarden --
start_pgwarden() {
  # In its own session, as PgBouncer (`-d` daemonizes) and every PostgreSQL backend are: with
  # the kernel's autogroup scheduling on, a session is one scheduling entity, and a proxy left in
  # this script's session would share its CPU share with pgbench and be preempted by it.
  RUST_LOG=${RUST_LOG:-warn} setsid "$PGWARDEN_BIN" serve --config "$TMP/pgwarden.toml" \
    >>"$TMP/pgwarden.log" 2>&1 </dev/null &
  PGW_PID=$!
  wait_sql "$PGW_PORT" bench "$BENCH_PW" bench pgwarden "$PGW_PID"
}

PGW_PORT=""
if has pgwarden; then
  PGW_PORT=$(free_port)
  log "starting pgwarden on 127.0.0.1:$PGW_PORT (pool $POOL)"
  (umask 077; printf '{"AWSCURRENT": {"engine":"postgres","host":"127.0.0.1","port":%s,"username":"bench","password":"%s","dbname":"bench"}}\n' \
    "$PG_PORT" "$BENCH_PW" >"$TMP/bench.secret.json")
  cat >"$TMP/pgwarden.toml" <<EOF
listen = "127.0.0.1:$PGW_PORT"
${PGW_WORKERS:+worker_threads = $PGW_WORKERS}

[database]
host = "127.0.0.1"
port = $PG_PORT
dbname = "bench"

[pool]
max_backend_connections = $POOL
max_client_connections = 10000

[tls]
cert = "$TMP/tls.crt"
key = "$TMP/tls.key"

[iam]
endpoints = ["127.0.0.1"]
proxy_id = "prx-bench"
account_id = "000000000000"
keyring = { source = "file", path = "$TMP/keyring.json" }

[audit]
output = "$TMP/audit.log"

[[credentials]]
user = "bench"
source = "file"
path = "$TMP/bench.secret.json"
# Over TLS an IAM token (or the password); without TLS, SCRAM.
iam_auth = "optional"
EOF
  BENCH_AKID=AKIDBENCH$(openssl rand -hex 6 | tr a-f A-F)
  BENCH_SECRET=$(openssl rand -hex 20)
  (umask 077; printf '{"keys": [{"access_key_id": "%s", "secret_access_key": "%s", "principal": "arn:aws:iam::000000000000:role/bench", "allow": ["arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-bench/*"]}]}\n' \
    "$BENCH_AKID" "$BENCH_SECRET" >"$TMP/keyring.json")
  start_pgwarden
fi

port_of() {
  case $1 in
    direct) echo "$PG_PORT" ;;
    pgbouncer) echo "$PGB_PORT" ;;
    pgwarden) echo "$PGW_PORT" ;;
  esac
}

# An IAM auth token for the bench user, signed with the bench keyring's key.
iam_token() {
  AWS_ACCESS_KEY_ID=$BENCH_AKID AWS_SECRET_ACCESS_KEY=$BENCH_SECRET AWS_REGION=us-east-1 \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    "$PGWARDEN_BIN" token --hostname 127.0.0.1 --port "$PGW_PORT" --username bench
}

# Neither pooler may share this script's session, where pgbench runs (see the start of
# pgwarden above); say so if one does.
session_check() {
  local pid sid mine
  mine=$(awk '{print $6}' /proc/$$/stat)
  for pid in $PGB_PID $PGW_PID; do
    sid=$(awk '{print $6}' "/proc/$pid/stat" 2>/dev/null) || continue
    [[ $sid != "$mine" ]] || printf ' (NOT pid %s: it shares the session of pgbench)' "$pid"
  done
}

# --------------------------------------------------------- report plumbing --
# How the measured binary was built: scripts/build-dist.sh's stamp, if it is this binary's.
pgwarden_build() {
  local stamp=${PGWARDEN_BIN}.build
  if [[ -f $stamp ]] && [[ $(cut -d' ' -f1 "$stamp") == $(sha256sum "$PGWARDEN_BIN" | cut -d' ' -f1) ]]; then
    cut -d' ' -f2- "$stamp"
  else
    echo "not built by scripts/build-dist.sh (no stamp for this binary)"
  fi
}
rm -rf "$OUT_DIR/raw" && mkdir -p "$OUT_DIR/raw"   # raw pgbench output of this run only
STAMP=$(date -u +%Y-%m-%dT%H:%M:%SZ)
REPORT=$TMP/report.md
PGW_REV=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo "(no commit)")
{
  echo "## pgwarden benchmark — $STAMP"
  echo
  echo "- machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM"
  echo "- pgwarden build: $(pgwarden_build)"
  echo "- PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), PgBouncer $("$PGBOUNCER_BIN" --version 2>/dev/null | head -1 | awk '{print $2}'), pgwarden $PGW_REV"
  echo "- pool size $POOL, pgbench -s 10, $DURATION s per run, $ROUNDS interleaved rounds (median kept), -j 2, TCP on 127.0.0.1, SCRAM auth, sslmode=disable (burst32: sslmode=require, one P-256 certificate for all; pgwarden clients log in with an IAM token)"
  echo "- PostgreSQL: fsync=off, synchronous_commit=off, shared_buffers=128MB, max_connections=400"
  echo "- scheduler: autogroup $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo n/a); each pooler, each PostgreSQL backend and pgbench in a session of its own$(session_check)"
  echo
} >"$REPORT"

# Print a markdown table with padded columns (reads '|'-separated rows on stdin).
md_table() {
  awk -F'|' '
    { n = NR; nf[n] = NF; for (i = 1; i <= NF; i++) { c[n, i] = $i; if (length($i) > w[i]) w[i] = length($i) } if (NF > maxf) maxf = NF }
    END {
      for (r = 1; r <= n; r++) {
        line = "|"
        for (i = 1; i <= maxf; i++) {
          if (r == 2) { s = ""; for (k = 0; k < w[i] + 2; k++) s = s "-"; line = line s "|" }
          else        { line = line sprintf(" %-" w[i] "s |", c[r, i]) }
        }
        print line
      }
    }'
}
fmt1() { if [[ -n $1 ]]; then printf '%.1f' "$1"; else printf 'ERR'; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b != "" && b + 0 > 0) printf "%.2fx", a / b; else printf "n/a" }'; }

# ------------------------------------------------------------ tps workloads --
declare -A W_LABEL=(
  [select32]="select-only, 32 clients (-S -c 32)"
  [select300]="select-only, 300 clients (-S -c 300)"
  [tpcb32]="tpcb-like, 32 clients (-c 32)"
  [extended32]="select-only, extended protocol, 32 clients (-S -M extended -c 32)"
  [prepared32]="select-only, named prepared statements, 32 clients (-S -M prepared -c 32)"
  [connect32]="select-only, new connection per tx, 32 clients (-S -C -c 32)"
  [burst32]="Lambda burst: new TLS connection per tx, 32 clients (-S -C -c 32, sslmode=require; pgwarden: IAM token, others: SCRAM)"
)
declare -A W_ARGS=(
  [select32]="-S -c 32"
  [select300]="-S -c 300"
  [tpcb32]="-c 32"
  [extended32]="-S -M extended -c 32"
  [prepared32]="-S -M prepared -c 32"
  [connect32]="-S -C -c 32"
  [burst32]="-S -C -c 32"
)
# Workloads whose clients use TLS (and, through pgwarden, an IAM token as the password).
declare -A W_TLS=([burst32]=1)
declare -A TPS LAT FAIL CONN NOTE CPU_US CTX USER_US
declare -A R_TPS R_LAT R_FAIL R_CONN R_NOTE R_CPU R_CTX R_USER

# utime+stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Context switches of the pooler's main thread: "voluntary involuntary".
user_ticks() { awk '{print $14}' "/proc/$1/stat" 2>/dev/null || echo 0; }
ctx_switches() { awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2} END {print v + 0, n + 0}' "/proc/$1/status" 2>/dev/null || echo 0 0; }
pid_of() {
  case $1 in
    pgbouncer) echo "${PGB_PID:-}" ;;
    pgwarden) echo "${PGW_PID:-}" ;;
    *) echo "" ;;
  esac
}
CLK_TCK=$(getconf CLK_TCK)
declare -A IDLE BUSY OTHER_US R_OTHER RUNQ_US

# "idle+iowait total" jiffies of all CPUs, from /proc/stat.
idle_share() {
  awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t }' /proc/stat
}

# Reset tpcb-like state so each system starts from the same point
# (what pgbench does itself unless -n; we pass -n so poolers are not asked to VACUUM).
reset_tables() {
  PGPASSWORD=$SUPER_PW psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench \
    -c 'TRUNCATE pgbench_history' -c 'VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts' >/dev/null
}

run_pgbench() {
  local w=$1 sys=$2 round=$3 port out rc=0 pid cpu0=0 cpu1=0 processed
  port=$(port_of "$sys")
  out=$OUT_DIR/raw/$w-$sys-r$round.txt
  pid=$(pid_of "$sys")
  reset_tables
  local ctx0=(0 0) ctx1=(0 0)
  local user0=0 user1=0
  [[ -n $pid ]] && cpu0=$(cpu_ticks "$pid") && user0=$(user_ticks "$pid") && read -ra ctx0 <<<"$(ctx_switches "$pid")"
  local idle0 idle1 wait0=0 wait1=0
  idle0=$(idle_share)
  [[ -n $pid ]] && wait0=$(awk '{print $2}' "/proc/$pid/schedstat")
  # Background + wait, so INT/TERM reach our trap at once instead of after pgbench.
  # shellcheck disable=SC2086  # W_ARGS is a word list on purpose
  local password=$BENCH_PW sslmode=disable
  if [[ -n ${W_TLS[$w]:-} ]]; then
    sslmode=require
    # A fresh token for each run (one token serves the whole run, as a Lambda function reuses
    # one within its 15 minutes; a long bench outlives a token made at start-up).
    [[ $sys == pgwarden ]] && password=$(iam_token)
  fi
  PGSSLMODE=$sslmode PGPASSWORD=$password timeout $((DURATION + 120)) \
    pgbench -n -j 2 -T "$DURATION" ${W_ARGS[$w]} -h 127.0.0.1 -p "$port" -U bench bench \
    >"$out" 2>&1 </dev/null &
  BENCH_PID=$!
  local perf_pid=""
  if [[ -n ${PERF_RECORD:-} && -n $pid ]]; then
    perf record -F 999 -g -p "$pid" -o "$out.perf.data" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  wait "$BENCH_PID" || rc=$?
  if [[ -n $perf_pid ]]; then kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null || true; fi
  BENCH_PID=""
  idle1=$(idle_share)
  [[ -n $pid ]] && wait1=$(awk '{print $2}' "/proc/$pid/schedstat")
  IDLE[$w,$sys]=$(awk -v a="$idle0" -v b="$idle1" 'BEGIN { split(a, x); split(b, y); if (y[2] > x[2]) printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]); else printf "n/a" }')
  BUSY[$w,$sys]=$(awk -v a="$idle0" -v b="$idle1" 'BEGIN { split(a, x); split(b, y); print (y[2] - x[2]) - (y[1] - x[1]) }')
  [[ -n $pid && -n ${SCHED_DEBUG:-} ]] && cat "/proc/$pid/sched" >"$out.sched"
  [[ -n $pid ]] && cpu1=$(cpu_ticks "$pid") && user1=$(user_ticks "$pid") && read -ra ctx1 <<<"$(ctx_switches "$pid")"
  processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
  if [[ -n $pid && -n $processed && $processed -gt 0 ]]; then
    CPU_US[$w,$sys]=$(awk -v t=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v n="$processed" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    CTX[$w,$sys]=$(awk -v v=$((ctx1[0] - ctx0[0])) -v i=$((ctx1[1] - ctx0[1])) -v n="$processed" 'BEGIN { printf "%.2f / %.2f", v / n, i / n }')
    USER_US[$w,$sys]=$(awk -v t=$((user1 - user0)) -v hz="$CLK_TCK" -v n="$processed" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  else
    CPU_US[$w,$sys]=""
    CTX[$w,$sys]=""
    USER_US[$w,$sys]=""
  fi
  TPS[$w,$sys]=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -1)
  OTHER_US[$w,$sys]=""
  RUNQ_US[$w,$sys]=""
  if [[ -n $processed && $processed -gt 0 ]]; then
    # Everything but the pooler: PostgreSQL, pgbench, the kernel's share of both.
    OTHER_US[$w,$sys]=$(awk -v t=$(( BUSY[$w,$sys] - (cpu1 - cpu0) )) -v hz="$CLK_TCK" -v n="$processed" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    # Time the pooler was runnable but waiting for a CPU (schedstat, ns), per transaction.
    RUNQ_US[$w,$sys]=$(awk -v t=$((wait1 - wait0)) -v n="$processed" 'BEGIN { printf "%.1f", t / 1e3 / n }')
  fi
  LAT[$w,$sys]=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -1)
  FAIL[$w,$sys]=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -1)
  FAIL[$w,$sys]=${FAIL[$w,$sys]:-0}
  # "initial connection time" (normal runs) or "average connection time" (-C)
  CONN[$w,$sys]=$(sed -n 's/^\(initial\|average\) connection time = \([0-9.]*\) ms.*/\2/p' "$out" | head -1)
  local aborted
  aborted=$(grep -c 'aborted' "$out" || true)
  NOTE[$w,$sys]=""
  if (( rc != 0 )); then NOTE[$w,$sys]="exit $rc"; fi
  if (( aborted > 0 )); then NOTE[$w,$sys]+="${NOTE[$w,$sys]:+, }$aborted abort msgs"; fi
  if grep -q '^number of transactions actually processed: 0$' "$out"; then
    # pgbench's -T clock includes connecting all clients first
    NOTE[$w,$sys]+="${NOTE[$w,$sys]:+, }0 tx: connecting took longer than DURATION?"
  fi
  printf '    %-10s r%s tps=%-12s lat=%-8s ms failed=%s cpu/tx=%sus (user %s) ctx/tx=%s idle=%s%% rest=%sus/tx runq=%sus/tx %s\n' "$sys" "$round" "${TPS[$w,$sys]:-ERR}" \
    "${LAT[$w,$sys]:--}" "${FAIL[$w,$sys]}" "${CPU_US[$w,$sys]:--}" "${USER_US[$w,$sys]:--}" "${CTX[$w,$sys]:--}" "${IDLE[$w,$sys]}" "${OTHER_US[$w,$sys]:-}" "${RUNQ_US[$w,$sys]:-}" "${NOTE[$w,$sys]}" >&2
  R_TPS[$w,$sys,$round]=${TPS[$w,$sys]:-}
  R_LAT[$w,$sys,$round]=${LAT[$w,$sys]:-}
  R_FAIL[$w,$sys,$round]=${FAIL[$w,$sys]}
  R_CONN[$w,$sys,$round]=${CONN[$w,$sys]:-}
  R_NOTE[$w,$sys,$round]=${NOTE[$w,$sys]}
  R_CPU[$w,$sys,$round]=${CPU_US[$w,$sys]:-}
  R_CTX[$w,$sys,$round]=${CTX[$w,$sys]:-}
  R_USER[$w,$sys,$round]=${USER_US[$w,$sys]:-}
  R_OTHER[$w,$sys,$round]=${OTHER_US[$w,$sys]:-}
}

# Keep the median round (by TPS) of (workload, system) as its result; failures are summed.
pick_median() {
  local w=$1 sys=$2 r best total_fail=0
  best=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${R_TPS[$w,$sys,$r]:-0} $r"; done | sort -g | awk -v m=$(( (ROUNDS + 1) / 2 )) 'NR == m {print $2}')
  for ((r = 1; r <= ROUNDS; r++)); do total_fail=$((total_fail + ${R_FAIL[$w,$sys,$r]:-0})); done
  TPS[$w,$sys]=${R_TPS[$w,$sys,$best]}
  LAT[$w,$sys]=${R_LAT[$w,$sys,$best]}
  CONN[$w,$sys]=${R_CONN[$w,$sys,$best]}
  NOTE[$w,$sys]=${R_NOTE[$w,$sys,$best]}
  CPU_US[$w,$sys]=${R_CPU[$w,$sys,$best]}
  CTX[$w,$sys]=${R_CTX[$w,$sys,$best]}
  USER_US[$w,$sys]=${R_USER[$w,$sys,$best]}
  OTHER_US[$w,$sys]=${R_OTHER[$w,$sys,$best]}
  FAIL[$w,$sys]=$total_fail
  RANGE[$w,$sys]=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${R_TPS[$w,$sys,$r]:-0}"; done | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.0f–%.0f", lo, hi}')
}
declare -A RANGE

# pgwarden/PgBouncer TPS of each round (the two ran back to back), and their median: robust
# to the machine's drift from minute to minute, which the ratio of the medians is not.
paired_ratios() {
  local w=$1 r list=""
  for ((r = 1; r <= ROUNDS; r++)); do
    list+="$(ratio "${R_TPS[$w,pgwarden,$r]:-}" "${R_TPS[$w,pgbouncer,$r]:-}") "
  done
  printf 'pgwarden / pgbouncer TPS round by round: %s→ median **%s**\n' "$list" \
    "$(tr ' ' '\n' <<<"$list" | grep -v '^$' | grep -v 'n/a' | tr -d x | sort -g | awk '{v[NR] = $1} END {printf "%.2fx", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')"
}

if [[ $MODE == all || $MODE == tps ]]; then
  echo "### Throughput (pgbench)" >>"$REPORT"
  echo >>"$REPORT"
  for w in $WORKLOADS; do
    [[ -n ${W_ARGS[$w]:-} ]] || die "unknown workload '$w'"
    log "workload $w: ${W_LABEL[$w]}"
    for ((round = 1; round <= ROUNDS; round++)); do
      # ABBA order: a machine that speeds up or slows down over a workload favours no one.
      order="direct pgbouncer pgwarden"
      (( round % 2 == 0 )) && order="pgwarden pgbouncer direct"
      for sys in $order; do
        if has "$sys"; then run_pgbench "$w" "$sys" "$round"; fi
      done
    done
    for sys in direct pgbouncer pgwarden; do
      if has "$sys"; then pick_median "$w" "$sys"; fi
    done
    {
      echo "#### ${W_LABEL[$w]}"
      echo
      {
        echo "system|TPS (median)|TPS range|mean latency (ms)|failed tx (all rounds)|proxy CPU µs/tx|of which user|proxy context switches/tx (sleeps / preempted)|rest of machine CPU µs/tx|connect (ms)|notes"
        echo "-|-|-|-|-|-|-|-|-|-|-"
        for sys in direct pgbouncer pgwarden; do
          has "$sys" || continue
          echo "$sys|$(fmt1 "${TPS[$w,$sys]:-}")|${RANGE[$w,$sys]}|${LAT[$w,$sys]:--}|${FAIL[$w,$sys]}|${CPU_US[$w,$sys]:--}|${USER_US[$w,$sys]:--}|${CTX[$w,$sys]:--}|${OTHER_US[$w,$sys]:--}|${CONN[$w,$sys]:--}|${NOTE[$w,$sys]}"
        done
        if has pgwarden; then
          for base in direct pgbouncer; do
            has "$base" || continue
            # latency ratio < 1 and TPS ratio > 1 are both "pgwarden better"
            echo "pgwarden / $base|$(ratio "${TPS[$w,pgwarden]:-}" "${TPS[$w,$base]:-}")||$(ratio "${LAT[$w,pgwarden]:-}" "${LAT[$w,$base]:-}")||$(ratio "${CPU_US[$w,pgwarden]:-}" "${CPU_US[$w,$base]:-}")|$(ratio "${USER_US[$w,pgwarden]:-}" "${USER_US[$w,$base]:-}")||$(ratio "${OTHER_US[$w,pgwarden]:-}" "${OTHER_US[$w,$base]:-}")|$(ratio "${CONN[$w,pgwarden]:-}" "${CONN[$w,$base]:-}")|"
          done
        fi
      } | md_table
      echo
      if has pgwarden && has pgbouncer; then paired_ratios "$w"; echo; fi
    } >>"$REPORT"
  done
  {
    echo "TPS excludes initial connection time, except for -C where it includes reconnection."
    echo "connect (ms) = pgbench's \"initial connection time\" (all clients, serial per thread) or, for -C, \"average connection time\"."
    echo
  } >>"$REPORT"
fi

# ------------------------------------------------------ idle-client memory --
measure_idle() {
  local sys=$1 pid port before after after_close line opened failed secs est i
  pid=$([[ $sys == pgbouncer ]] && echo "$PGB_PID" || echo "$PGW_PID")
  port=$(port_of "$sys")
  log "idle: opening $IDLE_CLIENTS clients to $sys (pid $pid)"
  sleep 1
  before=$(rss_kb "$pid")
  rm -f "$TMP/idle.in"
  mkfifo "$TMP/idle.in"
  PGPASSWORD=$BENCH_PW "$PY" "$BENCH_DIR/idle_clients.py" --port "$port" -n "$IDLE_CLIENTS" \
    <"$TMP/idle.in" >"$TMP/idle.out" 2>"$TMP/idle.err" &
  IDLE_PID=$!
  exec 7>"$TMP/idle.in"    # hold the client's stdin open; closing fd 7 releases it
  line=""
  for ((i = 0; i < 1200; i++)); do   # <= 10 min to open everything
    line=$(grep -m1 '^ready' "$TMP/idle.out" 2>/dev/null || true)
    [[ -n $line ]] && break
    kill -0 "$IDLE_PID" 2>/dev/null || break
    sleep 0.5
  done
  [[ -n $line ]] || line=$(grep -m1 '^ready' "$TMP/idle.out" 2>/dev/null || true)
  [[ -n $line ]] || { exec 7>&-; cat "$TMP/idle.err" >&2; die "idle client opener for $sys did not become ready"; }
  sleep 2   # let the server settle
  after=$(rss_kb "$pid")
  # server-side sockets still established (sanity check that clients are really held)
  est=$(ss -Htn state established "( sport = :$port )" | wc -l)
  opened=$(sed -n 's/.*opened=\([0-9]*\).*/\1/p' <<<"$line")
  failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$line")
  secs=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$line")
  exec 7>&-                # EOF on stdin: the opener closes its connections
  for _ in {1..120}; do kill -0 "$IDLE_PID" 2>/dev/null || break; sleep 0.5; done
  kill "$IDLE_PID" 2>/dev/null || true
  wait "$IDLE_PID" 2>/dev/null || true
  IDLE_PID=""
  sleep 2
  after_close=$(rss_kb "$pid")
  if [[ -s $TMP/idle.err ]]; then sed 's/^/    /' "$TMP/idle.err" >&2; fi
  local per
  per=$(awk -v a="$after" -v b="$before" -v n="$opened" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "n/a" }')
  printf '    %s: RSS %s kB -> %s kB with %s clients (%s failed, %ss to open) => %s KiB/client; %s kB after disconnect\n' \
    "$sys" "$before" "$after" "$opened" "$failed" "$secs" "$per" "$after_close" >&2
  echo "$sys|$opened|$est|$failed|$secs|$(mib "$before")|$(mib "$after")|$per|$(mib "$after_close")" >>"$TMP/idle.rows"
}

# ------------------------------------------------------------- cold pools --
# restart SYS — an empty pool (but for the connection of the start-up check).
restart() {
  case $1 in
    pgbouncer) stop_pid "$PGB_PID"; start_pgbouncer ;;
    pgwarden) stop_pid "$PGW_PID"; start_pgwarden ;;
  esac
}

# cold_round SYS ROUND — runs 32 select-only clients for 3 s with per-transaction logs against
# a just restarted SYS, and prints "worst latency of the transactions started in the first
# 0.2 s (ms), worst overall (ms), transactions over 100 ms, transactions" (a log line's time
# is when its transaction ended).
cold_round() {
  local sys=$1 round=$2 dir=$TMP/cold-$1-$2
  mkdir -p "$dir"
  PGPASSWORD=$BENCH_PW pgbench -n -S -c 32 -j 2 -T 3 -l --log-prefix="$dir/tx" \
    -h 127.0.0.1 -p "$(port_of "$sys")" -U bench bench >"$OUT_DIR/raw/cold-$sys-r$round.txt" 2>&1 || true
  cat "$dir"/tx.* 2>/dev/null | awk '{printf "%.0f %d\n", ($5 % 100000) * 1000000 + $6 - $3, $3}' | sort -n |
    awk 'NR == 1 {f = $1} {if ($1 - f < 200000 && $2 > first) first = $2; if ($2 > max) max = $2; if ($2 > 100000) slow++; n++}
         END {printf "%.1f %.1f %d %d\n", first / 1000, max / 1000, slow, n}'
}

if [[ $MODE == all || $MODE == cold ]]; then
  declare -A COLD
  log "cold pools: each pooler restarted, 32 clients, 3 s"
  for ((round = 1; round <= ROUNDS; round++)); do
    for sys in pgbouncer pgwarden; do
      if has "$sys"; then
        restart "$sys"
        COLD[$sys,$round]=$(cold_round "$sys" "$round")
        printf '    %-10s r%s first-0.2s-max/max ms, >100ms, tx: %s\n' "$sys" "$round" "${COLD[$sys,$round]}" >&2
      fi
    done
  done
  {
    echo "### Cold pools: the first transactions while the pool fills (32 clients, pool $POOL, pooler just restarted)"
    echo
    {
      echo "system|worst latency, tx started in the first 0.2 s (ms), median round|rounds|worst latency in 3 s (ms), median round|tx over 100 ms (all rounds)"
      echo "-|-|-|-|-"
      for sys in pgbouncer pgwarden; do
        has "$sys" || continue
        rows=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${COLD[$sys,$r]}"; done)
        echo "$sys|$(awk '{print $1}' <<<"$rows" | sort -g | awk -v m=$(( (ROUNDS + 1) / 2 )) 'NR == m')|$(awk '{printf "%s ", $1}' <<<"$rows")|$(awk '{print $2}' <<<"$rows" | sort -g | awk -v m=$(( (ROUNDS + 1) / 2 )) 'NR == m')|$(awk '{s += $3} END {print s}' <<<"$rows")"
      done
    } | md_table
    echo
  } >>"$REPORT"
fi

if [[ $MODE == all || $MODE == idle ]]; then
  : >"$TMP/idle.rows"
  for sys in pgwarden pgbouncer; do
    if has "$sys"; then measure_idle "$sys"; fi
  done
  {
    echo "### Memory per idle client ($IDLE_CLIENTS SCRAM-authenticated idle connections)"
    echo
    {
      echo "system|clients open|server sockets|failed|seconds to open|RSS before (MiB)|RSS with clients (MiB)|KiB per idle client|RSS after disconnect (MiB)"
      echo "-|-|-|-|-|-|-|-|-"
      cat "$TMP/idle.rows"
    } | md_table
    echo
    echo "KiB per idle client = (VmRSS with clients - VmRSS before) / clients open (VmRSS from /proc/PID/status)."
    echo "server sockets = established TCP connections on the server's listen port while the clients were held."
    echo
  } >>"$REPORT"
fi

# ----------------------------------------------------------------- output --
echo
cat "$REPORT"
cp "$REPORT" "$OUT_DIR/latest.md"
cp "$REPORT" "$OUT_DIR/$(date -u +%Y%m%d-%H%M%S)-$MODE.md"
log "wrote $OUT_DIR/latest.md (raw pgbench output in $OUT_DIR/raw/)"
