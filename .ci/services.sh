#!/usr/bin/env bash
# Make sure Postgres (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer; start them from the
# installed binaries when they do not. Fails with a one-line reason when that is impossible.
set -uo pipefail
PG_URL="${STUDIO_TEST_PG:-postgresql://postgres@127.0.0.1:5432}"

pg_up() { pg_isready -q -d "$PG_URL/postgres" 2>/dev/null || psql "$PG_URL/postgres" -Atqc 'select 1' >/dev/null 2>&1; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start >/dev/null 2>&1 || true
  fi
  if ! pg_up; then
    initdb=$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -1)
    [ -n "$initdb" ] || { echo "services: Postgres is down at $PG_URL and no initdb binary is installed" >&2; exit 1; }
    bindir=$(dirname "$initdb"); dir=/tmp/studio-pg
    runas=()
    if [ "$(id -u)" = 0 ]; then runas=(runuser -u postgres --); fi  # Postgres refuses to run as root
    if [ ! -d "$dir" ]; then
      mkdir -p "$dir" && { [ "$(id -u)" != 0 ] || chown postgres "$dir"; }
      "${runas[@]}" "$bindir/initdb" -D "$dir" -U postgres -A trust >/dev/null || { echo "services: initdb failed" >&2; exit 1; }
    fi
    "${runas[@]}" "$bindir/pg_ctl" -D "$dir" -o "-h 127.0.0.1 -p 5432 -k /tmp" -l "$dir/log" -w start >/dev/null || { echo "services: could not start Postgres (see $dir/log)" >&2; exit 1; }
  fi
  pg_up || { echo "services: Postgres did not come up at $PG_URL" >&2; exit 1; }
fi

if ! redis_up; then
  command -v redis-server >/dev/null || { echo "services: Redis is down at 127.0.0.1:6379 and redis-server is not installed" >&2; exit 1; }
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp >/dev/null
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "services: Redis did not come up on 127.0.0.1:6379" >&2; exit 1; }
fi
echo "services: Postgres and Redis are up"
