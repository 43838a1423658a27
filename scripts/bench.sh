#!/usr/bin/env bash
# Runs the load-generator scenarios behind docs/benchmarks.md against a
# release build, each with a server configured for it, on loopback only.
# Every server started here is stopped here, by its PID.
#
#   scripts/bench.sh            # all scenarios
#   scripts/bench.sh ttft       # one of: cache-hit ttft fanout idle-rss cluster stream-cost
#                               #         relay-floor chaos chaos-cluster
#
# TRANSPORT=http runs cache-hit and fanout over the OpenAI-compatible HTTP
# API (streamed answers, kept-alive connections) instead of WebSockets
# (TRANSPORT=ws, the default), with the same server configuration, e.g.
#   TRANSPORT=http CONNECTIONS=32 scripts/bench.sh cache-hit
#   TRANSPORT=http scripts/bench.sh fanout
# The other scenarios are WebSocket only and refuse TRANSPORT=http; with
# no scenario named, TRANSPORT=http runs those two.
#
# CHORUS_BIN and LOAD_BIN name the server and load-generator binaries
# (default: the release builds under target/), e.g. to compare two builds
# of the server in alternating runs. The release build is skipped when both
# are set.
set -euo pipefail
cd "$(dirname "$0")/.."
transport=${TRANSPORT:-ws}

if [ -z "${CHORUS_BIN:-}" ] || [ -z "${LOAD_BIN:-}" ]; then
  cargo build --release --locked --bins
fi
bin=${CHORUS_BIN:-target/release/chorus}
load=${LOAD_BIN:-target/release/chorus-load}
work=$(mktemp -d)
server_pid=""
extra_pids=()
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  for pid in "${extra_pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  # A failed run's server logs are the only trace of why: keep them.
  if [ "${status:-0}" -ne 0 ] && ls "$work"/*.log >/dev/null 2>&1; then
    keep=$(mktemp -d "${TMPDIR:-/tmp}/chorus-bench-logs.XXXXXX")
    cp "$work"/*.log "$keep"/
    echo "server logs of the failed run: $keep" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# listening FILE WHAT: prints the address after "WHAT http://" once a
# process has written that line to FILE; fails after 5 s without it.
listening() {
  local found
  for _ in $(seq 1 100); do
    found=$(sed -n "s#^$2 http://##p" "$1")
    [ -n "$found" ] && { echo "$found"; return 0; }
    sleep 0.05
  done
  return 1
}

# start_server NAME TOML: starts chorus on a free port; sets $addr and $server_pid.
start_server() {
  local name=$1 toml=$2
  printf '%s\n[history]\nsqlite_path = "%s/%s.db"\n' "$toml" "$work" "$name" >"$work/$name.toml"
  : >"$work/$name.out" # exists before the first look, which set -e would not survive
  RUST_LOG=warn "$bin" --config "$work/$name.toml" --bind 127.0.0.1:0 >"$work/$name.out" 2>"$work/$name.log" &
  server_pid=$!
  addr=$(listening "$work/$name.out" "chorus listening on") ||
    { echo "server $name did not start:" >&2; cat "$work/$name.log" >&2; exit 1; }
}

# start_upstream [FLAGS…]: starts the load generator's OpenAI-compatible
# upstream on a free port (64 tokens, the first after 200 ms, then 20 ms
# apart); sets $upstream (its address) and $upstream_pid.
start_upstream() {
  : >"$work/upstream.out"
  "$load" upstream --bind 127.0.0.1:0 --tokens 64 --interval-ms 20 --first-token-ms 200 "$@" \
    >"$work/upstream.out" 2>"$work/upstream.log" &
  upstream_pid=$!
  extra_pids+=("$upstream_pid")
  upstream=$(listening "$work/upstream.out" "upstream listening on") ||
    { echo "upstream did not start:" >&2; cat "$work/upstream.log" >&2; exit 1; }
}

# The chaos scenarios' server: short simulated answers, and pools and
# queues wide enough that 1,000 clients meet no `overloaded`.
chaos_toml='[workers]
intake_queue = 4096
follow_queue = 4096
max_concurrent_llm_streams = 256
[llm.simulated]
first_token_ms = 50
token_interval_ms = 10
tokens = 64'
status=0

stop_server() {
  # relay-floor starts no server.
  if [ -z "$server_pid" ]; then return; fi
  kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=""
}

run() {
  local scenario=$1
  if [ "$transport" != ws ] && [ "$scenario" != cache-hit ] && [ "$scenario" != fanout ]; then
    echo "TRANSPORT=$transport is for cache-hit and fanout only, not $scenario" >&2; exit 2
  fi
  case $scenario in
    cache-hit)
      start_server cache "[workers]
cache_workers = ${CACHE_WORKERS:-2}
"'[llm.simulated]
first_token_ms = 1
token_interval_ms = 0
tokens = 64'
      "$load" cache-hit --addr "$addr" --pid "$server_pid" --connections "${CONNECTIONS:-8}" --requests 20000 \
        --transport "$transport" ;;
    ttft)
      start_server ttft '[workers]
max_concurrent_llm_streams = 256
[llm.simulated]
first_token_ms = 200
token_interval_ms = 20
tokens = 64'
      "$load" ttft --addr "$addr" --connections 200 --rounds 5 --first-token-ms 200 ;;
    fanout)
      start_server fanout "[workers]
intake_queue = 4096
follow_queue = 4096
[llm.simulated]
first_token_ms = 3000
token_interval_ms = ${TOKEN_INTERVAL_MS:-20}
tokens = 64"
      "$load" fanout --addr "$addr" --pid "$server_pid" --connections "${CONNECTIONS:-2000}" \
        --transport "$transport" ;;
    idle-rss)
      start_server idle ''
      "$load" idle-rss --addr "$addr" --pid "$server_pid" --connections 2000 ;;
    cluster)
      # Two nodes sharing a Redis started here on a free port; connections
      # split over both ask one question.
      redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
      extra_pids+=($!)
      sleep 0.5
      redis_url="redis://127.0.0.1:$redis_port/"
      cluster_toml() { printf '[workers]\nintake_queue = 4096\nfollow_queue = 4096\n[llm.simulated]\nfirst_token_ms = 3000\ntoken_interval_ms = 20\ntokens = 64\n[cache]\nbackend = "redis"\nredis_url = "%s"\n[cluster]\nenabled = true\nredis_url = "%s"\nnode_id = "%s"\n' "$redis_url" "$redis_url" "$1"; }
      start_server node-b "$(cluster_toml node-b)"
      addr_b=$addr; extra_pids+=("$server_pid"); server_pid=""
      start_server node-a "$(cluster_toml node-a)"
      "$load" fanout --addr "$addr,$addr_b" --connections "${CONNECTIONS:-1000}" --redis "$redis_url" ;;
    stream-cost)
      # chorus streams from the load generator's OpenAI-compatible upstream
      # (64 tokens, the first after 200 ms, then 20 ms apart), started here
      # on a free port. TOOLS=false turns tool selection off;
      # UPSTREAM_ARGS adds flags to the upstream, e.g. --no-tools-support.
      # shellcheck disable=SC2086 # UPSTREAM_ARGS is a list of flags
      start_upstream ${UPSTREAM_ARGS:-}
      tools=""
      if [ "${TOOLS:-true}" = false ]; then tools=$'\n[tools]\nenabled = false'; fi
      start_server stream-cost "[llm]
provider = \"openai\"
base_url = \"http://$upstream/v1\"
[workers]
max_concurrent_llm_streams = ${STREAMS:-256}$tools"
      "$load" stream-cost --addr "$addr" --pid "$server_pid" --upstream "$upstream" --upstream-pid "$upstream_pid" \
        --connections "${CONNECTIONS:-200}" --rounds "${ROUNDS:-4}" --first-token-ms 200 ;;
    relay-floor)
      # No chorus: the least a relay must do for stream-cost's load (see
      # src/bin/chorus-load/relay_floor.rs), against the same upstream.
      start_upstream
      "$load" relay-floor --upstream "$upstream" --connections "${CONNECTIONS:-200}" --rounds "${ROUNDS:-4}" ;;
    chaos)
      # Misbehaving clients against one node (see src/bin/chorus-load/chaos.rs);
      # exits non-zero, after its summary, when a promise was broken.
      start_server chaos "$chaos_toml"
      "$load" chaos --addr "$addr" --pid "$server_pid" --clients "${CLIENTS:-1000}" \
        --seconds "${DURATION:-300}" || status=$? ;;
    chaos-cluster)
      # The same against two nodes sharing a Redis started here; every
      # resume goes to the other node.
      redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
      extra_pids+=($!)
      sleep 0.5
      redis_url="redis://127.0.0.1:$redis_port/"
      node_toml() { printf '%s\n[cache]\nbackend = "redis"\nredis_url = "%s"\n[cluster]\nenabled = true\nredis_url = "%s"\nnode_id = "%s"\n' "$chaos_toml" "$redis_url" "$redis_url" "$1"; }
      start_server node-b "$(node_toml node-b)"
      addr_b=$addr; pid_b=$server_pid; extra_pids+=("$server_pid"); server_pid=""
      start_server node-a "$(node_toml node-a)"
      "$load" chaos --addr "$addr,$addr_b" --pid "$server_pid,$pid_b" --clients "${CLIENTS:-300}" \
        --seconds "${DURATION:-90}" || status=$? ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  stop_server
}

if [ $# -gt 0 ]; then
  for s in "$@"; do run "$s"; done
elif [ "$transport" = ws ]; then
  for s in cache-hit ttft fanout idle-rss; do run "$s"; done
else
  for s in cache-hit fanout; do run "$s"; done
fi
exit "$status"
