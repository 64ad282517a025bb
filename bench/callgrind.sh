#!/usr/bin/env bash
# Counts pgwarden's user-space instructions per transaction with callgrind: deterministic, so
# it shows a 3% change that TPS on a shared 2-core VM cannot. Runs `pgwarden dev` (release
# build) under valgrind, warms the pool, then counts only `pgbench -S` transactions.
#
#   bench/callgrind.sh                 # 4 clients, pool 4, 10 000 select-only transactions
#   TX=20000 CLIENTS=8 POOL=4 bench/callgrind.sh
#   PGBENCH_ARGS="-M extended" bench/callgrind.sh
#
# Prints instructions per transaction and the functions that spend most of them (self cost).
# Needs valgrind (apt-get install valgrind), pgbench and PostgreSQL's server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-4}
POOL=${POOL:-4}
TX=${TX:-10000}
TOP=${TOP:-25}
PORT=${PORT:-6499}
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[[ ${SKIP_BUILD:-0} == 1 ]] || cargo build --release --bin pgwarden
OUT=$(mktemp -d /tmp/pgwarden-callgrind.XXXXXX)
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" target/release/pgwarden dev --port "$PORT" --pool-size "$POOL" \
  >"$OUT/dev.log" 2>&1 &
VG=$!
trap 'kill -INT $VG 2>/dev/null; wait $VG 2>/dev/null; rm -rf "$OUT"' EXIT
for _ in $(seq 1 240); do grep -q "accepting clients" "$OUT/dev.log" && break; sleep 0.5; done
PGPASSWORD=$(grep -o "PGPASSWORD='[^']*'" "$OUT/dev.log" | head -1 | cut -d"'" -f2)
export PGPASSWORD PGSSLMODE=disable
URL="host=127.0.0.1 port=$PORT user=dev dbname=dev"
pgbench -i -s 1 "$URL" >/dev/null 2>&1
pgbench -n -S -c "$POOL" -t 50 "$URL" >/dev/null 2>&1   # open the pool's backends first
per_client=$((TX / CLIENTS))
callgrind_control -z "$VG" >/dev/null
# shellcheck disable=SC2086  # word list on purpose
pgbench -n -S -c "$CLIENTS" -j 1 -t "$per_client" ${PGBENCH_ARGS:-} "$URL" | grep -E "processed|failed|^tps"
callgrind_control -d "$VG" >/dev/null
python3 - "$OUT"/cg.out.* "$((per_client * CLIENTS))" "$TOP" <<'PYEOF'
import collections, re, sys
path, tx, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
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
total = sum(cost.values())
print(f"\n{total / tx:.0f} instructions per transaction (pgwarden's process, user space)\n")
for name, c in cost.most_common(top):
    print(f"{c / tx:8.0f}  {100 * c / total:5.1f}%  {name[:120]}")
PYEOF
