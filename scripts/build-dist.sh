#!/usr/bin/env bash
# Builds what ships and what the benchmarks measure: target/dist/pgwarden, profile-guided.
#
#   scripts/build-dist.sh            # PGO when the tools are here, a plain dist build if not
#   PGWARDEN_PGO=1 scripts/build-dist.sh   # PGO or fail (the Dockerfile)
#   PGWARDEN_PGO=0 scripts/build-dist.sh   # plain `cargo build --profile dist`
#
# Profile-guided optimisation, as rustc documents it: build pgwarden instrumented
# (target/pgo/), run it as `pgwarden dev` under a few seconds of each workload bench/run.sh
# measures (pgbench select-only with the simple, extended and prepared protocols, tpcb-like,
# a new connection per transaction with SCRAM, over TLS, and over TLS with an IAM auth token),
# merge the counts with llvm-profdata, and build target/dist/pgwarden again with them. The
# compiler then lays the relay's hot path out together and inlines along it: 16-20% fewer
# instructions per relayed transaction (bench/callgrind.sh) for ~5 more minutes of build. Paths the training does not run (rotation,
# reloads, Secrets Manager) are built as cold code; none is on a per-transaction path.
#
# Needs, besides cargo: llvm-profdata of the LLVM major rustc was built with (Debian:
# llvm-<N>, e.g. llvm-22 for rustc 1.95; installed here when missing, as root), PostgreSQL's
# server binaries and pgbench (Debian: postgresql, postgresql-contrib). Extra arguments go to
# both cargo builds.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${PGWARDEN_PGO:-auto}
log() { printf '==> %s\n' "$*" >&2; }

# target/dist/pgwarden.build says how the binary beside it was built (bench/run.sh reports
# it), with the binary's checksum, so a later plain `cargo build` cannot borrow the claim.
stamp() { echo "$(sha256sum target/dist/pgwarden | cut -d' ' -f1) $1" >target/dist/pgwarden.build; }
plain() {
  log "building target/dist/pgwarden without a profile: $1"
  cargo build --profile dist --bin pgwarden "${@:2}"
  stamp "dist profile, no profile-guided optimisation ($1)"
  exit 0
}
[[ $MODE == 0 ]] && plain "PGWARDEN_PGO=0" "$@"

# The profile format follows LLVM's: llvm-profdata must be the major rustc uses. As root with
# apt-get, Debian's llvm-<major> is installed when missing (as scripts/test.sh installs
# PostgreSQL, and bench/run.sh PgBouncer).
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if ! command -v "llvm-profdata-$llvm_major" >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  log "installing llvm-$llvm_major (llvm-profdata, for the profile)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm_major" >/dev/null; } \
    || log "could not install llvm-$llvm_major"
fi
profdata=""
for candidate in "llvm-profdata-$llvm_major" llvm-profdata \
    "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"; do
  if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
    profdata=$candidate
    break
  fi
done
missing=()
[[ -n $profdata ]] || missing+=("llvm-profdata $llvm_major (Debian: llvm-$llvm_major)")
command -v pgbench >/dev/null 2>&1 || missing+=("pgbench (Debian: postgresql-contrib)")
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || [[ -x ${PGWARDEN_PG_BIN:-/nonexistent}/initdb ]] || missing+=("PostgreSQL's server binaries (Debian: postgresql)")
if (( ${#missing[@]} )); then
  [[ $MODE == 1 ]] && { echo "error: PGWARDEN_PGO=1 but missing: ${missing[*]}" >&2; exit 1; }
  plain "missing ${missing[*]}" "$@"
fi

PGO_DIR=$PWD/target/pgo
rm -rf "$PGO_DIR/raw" "$PGO_DIR/pgwarden.profdata"
mkdir -p "$PGO_DIR/raw"
log "1/3 building pgwarden instrumented (target/pgo)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PGO_DIR/build-raw" CARGO_TARGET_DIR=$PGO_DIR \
  cargo build --profile dist --bin pgwarden "$@"

log "2/3 training: pgwarden dev under pgbench"
work=$(mktemp -d /tmp/pgwarden-pgo.XXXXXX)
chmod 755 "$work"
dev=""
cleanup() {
  if [[ -n $dev ]]; then kill -INT "$dev" 2>/dev/null || true; wait "$dev" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
LLVM_PROFILE_FILE="$PGO_DIR/raw/pgwarden-%p-%m.profraw" \
  "$PGO_DIR/dist/pgwarden" dev --port 0 --pool-size 10 >"$work/dev.log" 2>&1 &
dev=$!
for _ in $(seq 1 240); do
  grep -q "accepting clients" "$work/dev.log" && break
  kill -0 "$dev" 2>/dev/null || { cat "$work/dev.log" >&2; exit 1; }
  sleep 0.5
done
grep -q "accepting clients" "$work/dev.log" || { cat "$work/dev.log" >&2; exit 1; }
port=$(grep -o "behind pgwarden on 127.0.0.1:[0-9]*" "$work/dev.log" | head -1 | cut -d: -f2)
PGPASSWORD=$(grep -o "PGPASSWORD='[^']*'" "$work/dev.log" | head -1 | cut -d"'" -f2)
# (dev prints the IAM token as a command: `$(AWS_...=... pgwarden token --hostname ...)`.)
mint=$(grep -o 'PGPASSWORD="\$([^)]*)"' "$work/dev.log" | head -1 | sed 's/^PGPASSWORD="\$(\(.*\))"$/\1/')
# shellcheck disable=SC2086  # the variables and arguments, split on purpose
token=$(env $mint)
export PGPASSWORD
url="host=127.0.0.1 port=$port user=dev dbname=dev"
train() {
  local what=$1; shift
  log "   $what"
  pgbench -n -j 2 "$@" | grep -E "^number of failed transactions: 0 " >/dev/null \
    || { echo "error: training run '$what' failed" >&2; exit 1; }
}
pgbench -i -s 1 "$url sslmode=disable" >/dev/null 2>&1
train "select-only, simple protocol" -S -c 32 -T 8 "$url sslmode=disable"
train "select-only, extended protocol" -S -M extended -c 32 -T 5 "$url sslmode=disable"
train "select-only, prepared statements" -S -M prepared -c 32 -T 3 "$url sslmode=disable"
train "tpcb-like" -c 16 -T 5 "$url sslmode=disable"
train "a new connection per transaction" -S -C -c 8 -T 3 "$url sslmode=disable"
train "a new TLS connection per transaction" -S -C -c 8 -T 3 "$url sslmode=require"
PGPASSWORD=$token train "a new TLS connection per transaction, IAM token" -S -C -c 8 -T 3 "$url sslmode=require"
kill -INT "$dev"
wait "$dev" || true   # the counts are written as the process exits
dev=""
"$profdata" merge -o "$PGO_DIR/pgwarden.profdata" "$PGO_DIR"/raw/*.profraw

log "3/3 building target/dist/pgwarden with the profile"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PGO_DIR/pgwarden.profdata" \
  cargo build --profile dist --bin pgwarden "$@"
stamp "dist profile, profile-guided (scripts/build-dist.sh)"
