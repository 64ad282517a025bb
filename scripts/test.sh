#!/usr/bin/env bash
# Runs every pgwarden test. Installs what a fresh Debian machine lacks first: the PostgreSQL
# server binaries the test harness starts its throwaway clusters with (and psql/pgbench, which
# the tests drive through the proxy), and a Python venv (target/pyenv) with boto3, whose
# generate_db_auth_token makes real IAM tokens for the tests, moto, psycopg and asyncpg. Safe to run
# again; installs nothing already present.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg_server() {
  [ -n "${PGWARDEN_PG_BIN:-}" ] && [ -x "$PGWARDEN_PG_BIN/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v initdb >/dev/null 2>&1
}

need_install=()
have_pg_server || need_install+=(postgresql)
command -v psql >/dev/null 2>&1 || need_install+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || need_install+=(postgresql-contrib)
if [ ${#need_install[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_install[*]} (missing)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
  else
    echo "missing PostgreSQL tools (${need_install[*]}): install Debian's postgresql package or set PGWARDEN_PG_BIN" >&2
    exit 1
  fi
fi
# As root, the harness runs PostgreSQL as the `postgres` OS user (Debian's package creates it).
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

# Python tools the tests drive: boto3 (real IAM auth tokens), moto's server (a real
# implementation of the Secrets Manager API), and two real drivers: psycopg 3 (on the system's
# libpq) and asyncpg. Pinned majors; the venv is reused while the
# requirements are unchanged.
PYENV=target/pyenv
REQS="boto3>=1.34,<2 moto[server]>=5.1,<6 psycopg>=3.2,<4 asyncpg>=0.29,<1"
if [ ! -x "$PYENV/bin/python" ] || [ "$(cat "$PYENV/.reqs" 2>/dev/null)" != "$REQS" ]; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "python3 with venv is needed (Debian: python3-venv)" >&2
      exit 1
    fi
  fi
  echo "setting up $PYENV ($REQS)"
  rm -rf "$PYENV"
  python3 -m venv "$PYENV"
  # shellcheck disable=SC2086  # REQS is a word list on purpose
  "$PYENV/bin/pip" install -q --disable-pip-version-check $REQS
  echo "$REQS" > "$PYENV/.reqs"
fi
export PGWARDEN_TEST_PYTHON="$PWD/$PYENV/bin/python"
export PGWARDEN_TEST_MOTO="$PWD/$PYENV/bin/moto_server"
# Credentials and region for the AWS SDK against moto (which does not check signatures).
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true

# `lambda` adds the feature-gated rotation Lambda handler, which tests/lambda_rotation.rs runs
# against a Runtime API emulator, moto and PostgreSQL (one build for everything).
cargo test --locked --all-targets --features lambda "$@"
