#!/usr/bin/env bash
# The whole clustered deployment on this one machine, for development and
# CI: a 3-node RabbitMQ cluster (`cityplane cluster up`), a PostgreSQL
# instance of its own, and N `cityplane controller` processes sharing it
# (one acts, the others stand by; with --shards S they share the fleet's S
# shards and one of them leads: docs/DEPLOYMENT.md). Real hosts take the
# same steps, each on its own machine (README "Beyond one machine").
#
#   deploy/dev-cluster.sh up [--dir DIR] [--pki DIR] [--controllers N]
#                            [--shards S] [--base-port P] [--pg-port P]
#   deploy/dev-cluster.sh status [--dir DIR]
#   deploy/dev-cluster.sh kill-controller K [--dir DIR]   # SIGKILL controller K (1-based)
#   deploy/dev-cluster.sh start-controller K [--dir DIR]  # start it again (stands by, or takes shards)
#   deploy/dev-cluster.sh down [--dir DIR]                # stops all; the database stays
#
# Defaults: --dir ./dev-cluster, --pki ./pki, 3 controllers, RabbitMQ's
# MQTTS on 28830-28832 (RabbitMQ uses up to base+30), PostgreSQL on
# base+40. The PKI needs a controller certificate (cityplane certs issue
# --pki ./pki --role controller --id controller). CITYPLANE names the
# binary (default: cityplane on PATH).
# As root, RabbitMQ runs as `rabbitmq` and PostgreSQL as `postgres`: both
# must be able to reach DIR.
set -euo pipefail

CITYPLANE=${CITYPLANE:-cityplane}
dir=./dev-cluster
pki=./pki
controllers=3
shards=
base=28830
pg_port=

die() {
  echo "dev-cluster: $*" >&2
  exit 1
}

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

verb=${1:-}
[ -n "$verb" ] || usage 2
shift
target=
if [ "$verb" = kill-controller ] || [ "$verb" = start-controller ]; then
  target=${1:-}
  [[ "$target" =~ ^[0-9]+$ ]] || die "$verb needs a controller number (1, 2, …)"
  shift
fi
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --pki) pki=$2; shift 2 ;;
    --controllers) controllers=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --base-port) base=$2; shift 2 ;;
    --pg-port) pg_port=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument $1 (see $0 --help)" ;;
  esac
done
[[ "$controllers" =~ ^[1-9][0-9]?$ ]] || die "--controllers must be 1 to 99"
[ -z "$shards" ] || [[ "$shards" =~ ^[1-9][0-9]{0,3}$ ]] || die "--shards must be 1 to 1024"
# RabbitMQ takes P to P+30 (docs/DEPLOYMENT.md).
pg_port=${pg_port:-$((base + 40))}

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

alive() {
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# acting / standing by / stopped (sharded: leading or not, and the shards
# held), from its pid file and log.
controller_state() {
  local i=$1 held
  if ! alive "$dir/controller-$i.pid"; then
    echo stopped
    return
  fi
  if [ -s "$dir/shards" ]; then
    held=$(grep -o 'holding=\[[0-9, ]*\]' "$dir/controller-$i.log" | tail -n 1 | sed 's/holding=//')
    if grep -q 'this controller acts' "$dir/controller-$i.log"; then
      echo "leading, shards ${held:-[]}"
    else
      echo "shards ${held:-[]}"
    fi
  elif grep -q 'this controller acts' "$dir/controller-$i.log"; then
    echo acting
  else
    echo "standing by"
  fi
}

start_controller() {
  local i=$1 nodes
  nodes="127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"
  # setsid: it outlives this script and its terminal.
  local sharding=()
  [ -s "$dir/shards" ] && sharding=(--shards "$(cat "$dir/shards")")
  setsid "$CITYPLANE" controller --broker "$nodes" --pki "$pki" --data "$dir/data" \
    --cluster-dir "$dir/rabbit" --store "$(cat "$dir/store.url")" "${sharding[@]}" \
    >"$dir/controller-$i.log" 2>&1 </dev/null &
  echo $! >"$dir/controller-$i.pid"
}

wait_for() {
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 5))); do
    if "$@"; then return 0; fi
    sleep 0.2
  done
  die "$what did not happen within $secs s"
}

up() {
  [ -f "$pki/ca.crt" ] || die "no CA in $pki (cityplane certs init --pki $pki)"
  [ -f "$pki/controller.crt" ] ||
    die "no controller certificate in $pki (cityplane certs issue --pki $pki --role controller --id controller)"
  [ -n "$pg_bin" ] || die "PostgreSQL is not installed (Debian: apt-get install postgresql)"
  mkdir -p "$dir"
  dir=$(realpath "$dir")
  pki=$(realpath "$pki")
  for i in $(seq "$controllers"); do
    alive "$dir/controller-$i.pid" && die "controller $i is already running (down first)"
  done

  echo "RabbitMQ: 3 nodes from $pki (~25 s)"
  "$CITYPLANE" cluster up --dir "$dir/rabbit" --pki "$pki" --base-port "$base"
  if [ -n "$shards" ]; then
    echo "$shards" >"$dir/shards"
    "$CITYPLANE" cluster sync --dir "$dir/rabbit" --pki "$pki" --shards "$shards" >/dev/null
  else
    : >"$dir/shards"
    "$CITYPLANE" cluster sync --dir "$dir/rabbit" --pki "$pki" >/dev/null
  fi

  echo "PostgreSQL on 127.0.0.1:$pg_port"
  if [ ! -f "$dir/pg/data/PG_VERSION" ]; then
    mkdir -p "$dir/pg"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/pg"
    as_postgres "$pg_bin/initdb" -D "$dir/pg/data" -U postgres --auth=trust -E UTF8 \
      --no-instructions >"$dir/pg/initdb.log" 2>&1 ||
      die "initdb failed: $(cat "$dir/pg/initdb.log")"
  fi
  as_postgres "$pg_bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $dir/pg" start >/dev/null ||
    die "PostgreSQL did not start: $(tail -n 5 "$dir/pg/postgres.log")"
  echo "postgres://postgres@127.0.0.1:$pg_port/postgres" >"$dir/store.url"
  echo "$pki" >"$dir/pki.path"
  echo "$base" >"$dir/base.port"

  echo "$controllers controllers on $(cat "$dir/store.url")"
  start_controller 1
  wait_for "controller 1 acting" 60 grep -q 'this controller acts' "$dir/controller-1.log"
  for i in $(seq 2 "$controllers"); do
    start_controller "$i"
    if [ -n "$shards" ]; then
      wait_for "controller $i sharing the fleet" 30 grep -q 'another controller leads' "$dir/controller-$i.log"
    else
      wait_for "controller $i standing by" 30 grep -q 'standing by' "$dir/controller-$i.log"
    fi
  done
  status
  echo
  echo "Operators: CITYPLANE_CLUSTER=true CITYPLANE_SERVER=127.0.0.1:$base CITYPLANE_PKI=$pki cityplane status --id <operator>"
}

status() {
  "$CITYPLANE" cluster status --dir "$dir/rabbit" || true
  if [ -n "$pg_bin" ] && [ -f "$dir/pg/data/PG_VERSION" ] &&
    as_postgres "$pg_bin/pg_ctl" -D "$dir/pg/data" status >/dev/null 2>&1; then
    echo "postgresql: running ($(cat "$dir/store.url" 2>/dev/null))"
  else
    echo "postgresql: stopped"
  fi
  for pidfile in "$dir"/controller-*.pid; do
    [ -f "$pidfile" ] || continue
    local i=${pidfile##*/controller-}
    i=${i%.pid}
    echo "controller $i: $(controller_state "$i") (pid $(cat "$pidfile"), log $dir/controller-$i.log)"
  done
}

down() {
  local pids=()
  for pidfile in "$dir"/controller-*.pid; do
    alive "$pidfile" && pids+=("$(cat "$pidfile")")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "${pids[@]}" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  rm -f "$dir"/controller-*.pid
  if [ -n "$pg_bin" ] && [ -f "$dir/pg/data/postmaster.pid" ]; then
    as_postgres "$pg_bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null || true
  fi
  if [ -f "$dir/rabbit/cluster.json" ]; then
    "$CITYPLANE" cluster down --dir "$dir/rabbit"
  fi
  echo "stopped; the database and logs stay in $dir (remove it to start afresh)"
}

case "$verb" in
  up) up ;;
  status) status ;;
  down) down ;;
  kill-controller)
    alive "$dir/controller-$target.pid" || die "controller $target is not running"
    kill -KILL "$(cat "$dir/controller-$target.pid")"
    if [ -s "$dir/shards" ]; then
      echo "controller $target killed; its shards (and the lead, if it led) move to the others within ~7 s"
    else
      echo "controller $target killed; a standby takes over within ~7 s"
    fi
    ;;
  start-controller)
    dir=$(realpath "$dir")
    [ -f "$dir/store.url" ] || die "no cluster in $dir (up first)"
    pki=$(cat "$dir/pki.path")
    base=$(cat "$dir/base.port")
    alive "$dir/controller-$target.pid" && die "controller $target is running"
    start_controller "$target"
    echo "controller $target started (log $dir/controller-$target.log)"
    ;;
  -h|--help|help) usage 0 ;;
  *) die "unknown verb $verb (up, status, kill-controller, start-controller, down)" ;;
esac
