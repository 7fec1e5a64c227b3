#!/usr/bin/env bash
# One run on a machine with a GPU checks the CUDA path and writes the GPU tables:
#   bench/gpu_check.sh                      # after `make install-dev`; ~15 minutes on one GPU
# A dry run of the same steps on CPU, at tiny sizes:
#   DEVICE=cpu SHAPE=tiny SIZES=2x32 PROMPTS=16 RESPONSES=4 MAX_NEW=16 bench/gpu_check.sh
# Steps: (1) hidden states and Hista values on the device (float32, bfloat16, every forward
# path) against CPU float32; (2) `statevalue serve --device DEVICE`: time to ready, one
# request, SIGTERM exits 0; (3) bench/perf.py on a random-weight model of Qwen2.5-1.5B's
# shape for each prompt length. Everything lands in $OUT_DIR (default gpu-check/).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-qwen2.5-1.5b}
SIZES=${SIZES:-16x1024,16x4096}
PROMPTS=${PROMPTS:-256 1024}
RESPONSES=${RESPONSES:-8}
MAX_NEW=${MAX_NEW:-96}
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-gpu-check}
mkdir -p "$OUT_DIR"

echo "== 1. parity on $DEVICE against CPU float32"
"$PYTHON" -m bench.device_parity --device "$DEVICE" --responses "$RESPONSES" \
    --max-new "$MAX_NEW" | tee "$OUT_DIR/parity.txt"

echo "== 2. statevalue serve --device $DEVICE, one request, SIGTERM"
port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(port)
GRPC_PORT=$(port)
SECONDS=0
"$PYTHON" -m statevalue.cli serve --device "$DEVICE" --http-port "$HTTP_PORT" \
    --grpc-port "$GRPC_PORT" > "$OUT_DIR/serve.log" 2>&1 &
server=$!
until curl -sf "localhost:$HTTP_PORT/readyz" > /dev/null; do
    kill -0 "$server" 2> /dev/null || { echo "the server exited during start-up"; exit 1; }
    sleep 0.5
done
ready=$SECONDS
curl -sf "localhost:$HTTP_PORT/v1/estimate" -H 'content-type: application/json' -d '{
  "methods": ["numca", "hista", "group_mean"],
  "groups": [{"prompt_ids": [1, 2, 3],
              "rollouts": [{"response_ids": [4, 5, 6], "reward": 1.0},
                           {"response_ids": [7, 8], "reward": 0.0}]}]}' > "$OUT_DIR/estimate.json"
grep -q '"hista"' "$OUT_DIR/estimate.json"
kill -TERM "$server"
set +e
wait "$server"
code=$?
set -e
echo "ready after ${ready} s; one request answered; exit code after SIGTERM $code" \
    | tee "$OUT_DIR/serve.txt"
[ "$code" -eq 0 ]

echo "== 3. bench/perf.py on $DEVICE, random-init $SHAPE"
for prompt in $PROMPTS; do
    "$PYTHON" -m bench.perf --device "$DEVICE" --random-init "$SHAPE" --sizes "$SIZES" \
        --prompt-tokens "$prompt" --json "$OUT_DIR/perf-p$prompt.json" \
        | tee "$OUT_DIR/perf-p$prompt.txt"
done
echo "== done: $OUT_DIR"
