#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL servers the integration tests use are up.
# On this project's machines both are started before a session; this only restarts one
# that has stopped (with the same commands the machine uses), and fails loudly when it
# cannot: the tests need the real servers and must never pass by skipping them.
set -u
redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

if ! redis_up; then
  echo "Redis not answering on 127.0.0.1:6379; starting it" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
if ! pg_up; then
  echo "PostgreSQL not answering on 127.0.0.1:5432; starting it" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
fi
redis_up || { echo "FATAL: Redis is required at 127.0.0.1:6379" >&2; exit 1; }
pg_up || { echo "FATAL: PostgreSQL is required at 127.0.0.1:5432" >&2; exit 1; }
