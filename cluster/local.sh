#!/usr/bin/env bash
# A 2-node Ray cluster on this machine for trying multi-node rtft searches (dashboard on
# 127.0.0.1; Ray itself registers the nodes under the host IP, so token auth stays on).
#
#   cluster/local.sh start      # head + 1 worker node, 1 CPU each; prints the addresses
#   cluster/local.sh status     # the nodes Ray sees
#   cluster/local.sh stop       # stops exactly these two nodes (and their workers)
#
# Never `ray stop` here: it stops every Ray on the machine (other people's too). Each node is
# started as `ray start --block` in its own process group with its own --temp-dir; stop kills
# those process groups and every process they spawned (Ray workers run in their own sessions,
# so they are found by parent pid), nothing else.
#
# Settings (environment): RTFT_LOCAL_DIR (state, logs, Ray's temp dir; default
# /tmp/rtft-local-$USER, keep it short: Ray's socket paths must fit in 107 bytes),
# RTFT_LOCAL_PORT (GCS port, default 6390), RTFT_LOCAL_DASHBOARD_PORT (default 8266),
# RTFT_LOCAL_CLIENT_PORT (Ray Client, default 10001; below Ray's worker ports 10002+),
# RTFT_LOCAL_CPUS (CPUs per node, default 1), RTFT_LOCAL_GRACE_S (seconds a node may drain
# on stop before it is killed, default 10).
#
# Token auth (Ray >= 2.60): the cluster runs with RAY_AUTH_MODE=token. Unless you set
# RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH yourself, a fresh token is written to
# $RTFT_LOCAL_DIR/auth_token (mode 600); `start` prints the two exports a client needs.
# Ray sends the token only when RAY_AUTH_MODE=token is set in the client's environment.
set -euo pipefail

DIR="${RTFT_LOCAL_DIR:-/tmp/rtft-local-${USER:-$(id -un)}}"
PORT="${RTFT_LOCAL_PORT:-6390}"
DASH="${RTFT_LOCAL_DASHBOARD_PORT:-8266}"
CLIENT="${RTFT_LOCAL_CLIENT_PORT:-10001}"
CPUS="${RTFT_LOCAL_CPUS:-1}"
GRACE="${RTFT_LOCAL_GRACE_S:-10}"
IP=127.0.0.1

auth_env() {  # token auth for the nodes and our own probes
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]
  then
    if [[ ! -s "$DIR/auth_token" ]]; then
      (umask 077; python -c 'import secrets; print(secrets.token_hex(32), end="")' \
        > "$DIR/auth_token")
    fi
    export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
  fi
}

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

free_port() {  # a port nothing listens on now (the kernel picks it)
  python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

descendants() {  # every process below pid $1 (Ray workers call setsid: not in the group)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    echo "$child"
    descendants "$child"
  done
}

start_node() {  # name, then ray start arguments
  local name="$1"; shift
  # setsid: the node gets its own process group, so stop can signal exactly it.
  setsid ray start --block --node-ip-address "$IP" --num-cpus "$CPUS" \
    --disable-usage-stats "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/$name.pid"
}

wait_nodes() {  # until Ray reports $1 alive nodes, or 90 s
  local want="$1" deadline=$((SECONDS + 90)) n=0
  while (( SECONDS < deadline )); do
    for name in head worker; do  # a node that exited will not come up: say why at once
      if [[ -f "$DIR/$name.pid" ]] && ! kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null; then
        echo "the $name node exited; its log:" >&2; tail -n 30 "$DIR/$name.log" >&2; return 1
      fi
    done
    n=$(RAY_ADDRESS="$IP:$PORT" python - <<'EOF' 2>/dev/null || echo 0
import logging, ray
ray.init(logging_level=logging.ERROR, log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
    [[ "$n" == "$want" ]] && return 0
    sleep 1
  done
  echo "only $n of $want nodes came up within 90 s; logs in $DIR" >&2
  return 1
}

stop_node() {
  local name="$1" pid pids
  [[ -f "$DIR/$name.pid" ]] || return 0
  pid="$(cat "$DIR/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    pids="$pid $(descendants "$pid" | tr '\n' ' ')"
    kill -TERM -- "-$pid" 2>/dev/null || true      # the node's process group
    kill -TERM $pids 2>/dev/null || true          # and workers in their own sessions
    for _ in $(seq 1 $((GRACE * 2))); do
      alive=""
      for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
      [[ -z "$alive" ]] && break
      sleep 0.5
    done
    [[ -n "${alive:-}" ]] && kill -KILL $alive 2>/dev/null || true
  fi
  rm -f "$DIR/$name.pid"
}

cmd="${1:-}"
case "$cmd" in
  start)
    mkdir -p "$DIR"
    auth_env
    if [[ -f "$DIR/head.pid" ]] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
      echo "already running (state in $DIR); cluster/local.sh stop first" >&2; exit 1
    fi
    start_node head --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
      --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$CLIENT" \
      --temp-dir "$DIR/ray"
    # The worker needs its own agent port: two nodes on one machine cannot share Ray's default.
    wait_nodes 1 || { "$0" stop; exit 1; }
    start_node worker --address "$IP:$PORT" --dashboard-agent-listen-port "$(free_port)" \
      --temp-dir "$DIR/ray"
    wait_nodes 2 || { "$0" stop; exit 1; }
    cat <<EOF
2-node Ray cluster up (state and logs in $DIR)
  GCS address:   $IP:$PORT        rtft search SPEC --address $IP:$PORT
  Jobs API:      http://$IP:$DASH   rtft submit SPEC --address http://$IP:$DASH
  Ray Client:    ray://$IP:$CLIENT  rtft search SPEC --address ray://$IP:$CLIENT
  dashboard:     http://$IP:$DASH   (bound to 127.0.0.1)
  auth:          export RAY_AUTH_MODE=token${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}
  stop:          $0 stop
EOF
    ;;
  stop)
    stop_node worker
    stop_node head
    # Helpers that left the nodes' process trees (dashboard agents, log monitors reparented to
    # init) still name our temp dir on their command line: wait for them, then kill them.
    for _ in $(seq 1 $((GRACE * 2))); do
      left="$(pgrep -f -- "$DIR" | grep -vx "$$" || true)"
      [[ -z "$left" ]] && break
      kill -TERM $left 2>/dev/null || true
      sleep 0.5
    done
    left="$(pgrep -f -- "$DIR" | grep -vx "$$" || true)"
    [[ -n "$left" ]] && kill -KILL $left 2>/dev/null || true
    echo "stopped the local cluster in $DIR"
    ;;
  status)
    auth_env
    RAY_ADDRESS="$IP:$PORT" python - <<'EOF'
import logging, ray
ray.init(logging_level=logging.ERROR, log_to_driver=False)
for n in ray.nodes():
    print(n["NodeID"][:12], "alive" if n["Alive"] else "dead ",
          n["NodeManagerAddress"], n["Resources"].get("CPU", 0), "CPU",
          "(head)" if "node:__internal_head__" in n["Resources"] else "")
EOF
    ;;
  *) usage ;;
esac
