#!/usr/bin/env bash
# Start the services the tests use (PostgreSQL, Redis, NATS with JetStream on
# 127.0.0.1) when they are down, and wait until each answers. Those already
# running are left alone. Used by scripts/test.sh and .ci/run.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Each check asks the service itself, not just its port.
pg_answers() { psql -h 127.0.0.1 -d test -Atqc 'SELECT 1' 2>/dev/null | grep -qx 1; }
redis_answers() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
nats_answers() {
  # A NATS server greets every connection with an INFO line.
  timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222 && head -c 4 <&3' 2>/dev/null | grep -q INFO
}
wait_for() {
  for _ in $(seq 1 150); do "$1" && return 0; sleep 0.2; done
  echo "services.sh: $2 does not answer on 127.0.0.1 (started with: $3)" >&2
  return 1
}

PG_START='pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start'
REDIS_START='redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'
NATS_START='start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log'

if ! port_open 5432; then
  echo "services.sh: starting PostgreSQL" >&2
  eval "$PG_START" || true
fi
if ! port_open 6379; then
  echo "services.sh: starting Redis" >&2
  eval "$REDIS_START" || true
fi
if ! port_open 4222; then
  echo "services.sh: starting NATS" >&2
  eval "$NATS_START" || true
fi
wait_for pg_answers PostgreSQL "$PG_START"
wait_for redis_answers Redis "$REDIS_START"
wait_for nats_answers NATS "$NATS_START"
