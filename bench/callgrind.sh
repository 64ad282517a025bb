#!/usr/bin/env bash
# Counts a pooler's user-space instructions per transaction with callgrind: deterministic, so
# it shows a 3% change that TPS on a shared 2-core VM cannot. Runs `pgwarden dev` (dist
# build) for its throwaway PostgreSQL and, by default, under valgrind; with
# SYSTEM=pgbouncer, PgBouncer runs under valgrind in front of the same PostgreSQL instead
# (transaction pooling, SCRAM, same pool size), for a like-for-like count.
#
#   bench/callgrind.sh                 # pgwarden: 4 clients, pool 4, select-only
#   SYSTEM=pgbouncer bench/callgrind.sh
#   TX=20000 CLIENTS=8 POOL=4 bench/callgrind.sh
#   PGBENCH_ARGS="-M extended" bench/callgrind.sh
#   BUILTIN=tpcb-like bench/callgrind.sh   # pgbench's read/write script (default select-only)
#   KEEP=1 bench/callgrind.sh          # keep the dumps, for callgrind_annotate
#
# Two counted runs, TX/4 and then TX transactions (new clients each, pool warmed first); the
# difference of the two is divided by the difference in transactions, so client logins
# (PgBouncer derives a SCRAM key per login: millions of instructions) cancel out.
# Prints instructions per transaction and the functions that spend most of them (self cost).
# Needs valgrind (apt-get install valgrind), pgbench and PostgreSQL's server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM=${SYSTEM:-pgwarden}
CLIENTS=${CLIENTS:-4}
POOL=${POOL:-4}
TX=${TX:-10000}
TOP=${TOP:-25}
BUILTIN=${BUILTIN:-select-only}
PGWARDEN_BIN=${PGWARDEN_BIN:-target/dist/pgwarden}
PORT=${PORT:-6499}
PGB_PORT=${PGB_PORT:-6498}
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[[ $SYSTEM == pgwarden || $SYSTEM == pgbouncer ]] || { echo "SYSTEM must be pgwarden or pgbouncer" >&2; exit 1; }
[[ ${SKIP_BUILD:-0} == 1 ]] || scripts/build-dist.sh
OUT=$(mktemp -d /tmp/pgwarden-callgrind.XXXXXX)
chmod 755 "$OUT"
DEV="" VG=""
cleanup() {
  [[ -n $VG ]] && kill -INT "$VG" 2>/dev/null
  [[ -n $DEV && $DEV != "$VG" ]] && kill -INT "$DEV" 2>/dev/null
  wait 2>/dev/null
  if [[ ${KEEP:-0} == 1 ]]; then echo "dumps kept in $OUT" >&2; else rm -rf "$OUT"; fi
}
trap cleanup EXIT
as_owner() { "$@"; }   # who may talk to the valgrind'ed process

if [[ $SYSTEM == pgwarden ]]; then
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "$PGWARDEN_BIN" dev --port "$PORT" --pool-size "$POOL" \
    >"$OUT/dev.log" 2>&1 &
  DEV=$!
  VG=$DEV
else
  "$PGWARDEN_BIN" dev --port "$PORT" --pool-size "$POOL" >"$OUT/dev.log" 2>&1 &
  DEV=$!
fi
for _ in $(seq 1 240); do grep -q "accepting clients" "$OUT/dev.log" && break; sleep 0.5; done
PGPASSWORD=$(grep -o "PGPASSWORD='[^']*'" "$OUT/dev.log" | head -1 | cut -d"'" -f2)
export PGPASSWORD PGSSLMODE=disable
URL="host=127.0.0.1 port=$PORT user=dev dbname=dev"
pgbench -i -s 1 "$URL" >/dev/null 2>&1

if [[ $SYSTEM == pgbouncer ]]; then
  PGB=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
  PG_PORT=$(grep -o "PostgreSQL on 127.0.0.1:[0-9]*" "$OUT/dev.log" | head -1 | cut -d: -f2)
  printf '"dev" "%s"\n' "$PGPASSWORD" >"$OUT/users.txt"
  cat >"$OUT/pgbouncer.ini" <<EOF
[databases]
dev = host=127.0.0.1 port=$PG_PORT dbname=dev
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $OUT/users.txt
pool_mode = transaction
default_pool_size = $POOL
ignore_startup_parameters = extra_float_digits
logfile = $OUT/pgbouncer.log
EOF
  run=()
  if [[ $(id -u) -eq 0 ]]; then   # PgBouncer refuses to run as root
    chown -R postgres: "$OUT"
    run=(runuser -u postgres --)
    as_owner() { runuser -u postgres -- "$@"; }
  fi
  "${run[@]}" valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "$PGB" "$OUT/pgbouncer.ini" >"$OUT/vg.log" 2>&1 &
  URL="host=127.0.0.1 port=$PGB_PORT user=dev dbname=dev"
  for _ in $(seq 1 120); do psql -XAtq "$URL" -c "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
  VG=$(pgrep -f "callgrind.*pgbouncer.ini" | tail -1)   # valgrind itself, not runuser
fi

pgbench -n -S -c "$POOL" -t 50 "$URL" >/dev/null 2>&1   # open the pool's backends first
# One counted run: zero the counters, run `$1` transactions, dump; prints the dump's path.
counted() {
  local per_client=$(($1 / CLIENTS)) before
  before=$(ls "$OUT"/cg.out.* 2>/dev/null | wc -l)
  as_owner callgrind_control -z "$VG" >/dev/null
  # shellcheck disable=SC2086  # word list on purpose
  pgbench -n -b "$BUILTIN" -c "$CLIENTS" -j 1 -t "$per_client" ${PGBENCH_ARGS:-} "$URL" | grep -E "processed|failed" >&2
  as_owner callgrind_control -d "$VG" >/dev/null
  for _ in $(seq 1 50); do (( $(ls "$OUT"/cg.out.* 2>/dev/null | wc -l) > before )) && break; sleep 0.2; done
  ls -t "$OUT"/cg.out.* | head -1
}
small=$(counted $((TX / 4)))
large=$(counted "$TX")
python3 - "$small" "$large" "$(( TX / CLIENTS * CLIENTS - TX / 4 / CLIENTS * CLIENTS ))" "$TOP" "$SYSTEM" <<'PYEOF'
import collections, re, sys
small, large, tx, top, system = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def self_costs(path):
    names, cost, cur, in_call = {}, collections.Counter(), None, False
    for line in open(path):
        m = re.match(r'^(fn|cfn)=\((\d+)\)(?: (.*))?$', line.rstrip('\n'))
        if m:
            kind, i, name = m.groups()
            if name:
                names[i] = name
            if kind == 'fn':
                cur = names[i]
            continue
        if line.startswith('calls='):
            in_call = True
            continue
        if line[:1].isdigit() or line[:1] in '+-*':
            parts = line.split()
            if len(parts) >= 2:
                if in_call:
                    in_call = False  # inclusive cost of a call: not this function's own
                    continue
                cost[cur] += int(parts[1])
    return cost

cost = self_costs(large)
cost.subtract(self_costs(small))
total = sum(cost.values())
print(f"\n{total / tx:.0f} instructions per transaction ({system}'s process, user space)\n")
for name, c in cost.most_common(top):
    print(f"{c / tx:8.0f}  {100 * c / total:5.1f}%  {name[:120]}")
PYEOF
