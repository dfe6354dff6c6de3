#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the PostgreSQL tests when it is missing and we may (root + apt).
# tests/pg.py starts a throwaway server from its binaries (initdb + pg_ctl in a temporary folder); no system
# cluster is created or started. Without the binaries those tests are skipped with a reason.
set -u
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: PostgreSQL not installed (needs root + apt-get); the PostgreSQL tests will be skipped" >&2
  exit 0
fi
echo "installing Debian postgresql for the PostgreSQL tests..." >&2
export DEBIAN_FRONTEND=noninteractive
# The tests run their own server: don't let the package create (and start) the default cluster.
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
fi
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } \
  >/tmp/ensure_postgres.log 2>&1 || echo "note: postgresql install failed (see /tmp/ensure_postgres.log); PostgreSQL tests will skip" >&2
exit 0
