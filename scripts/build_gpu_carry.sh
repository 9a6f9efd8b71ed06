#!/usr/bin/env bash
# Build .gpu-carry/: sage-llm and the packages it needs that a lent GPU machine may lack or have in other versions,
# for `bash scripts/gpu_check.sh` there (docs/gpu.md, "Verifying on a real GPU"). That machine has no network: its
# python3 (3.12) has torch with CUDA, nvidia-ml-py, psutil, rich, typer and httpx, in versions we do not know.
#
#   .gpu-carry/pure/                     sage-llm (a wheel of this tree) + pure-Python dependencies, at the versions
#                                        of this project's .venv (the ones the tests ran with)
#   .gpu-carry/native-cp312-x86_64/      pydantic-core (Typer >= 0.29 imports pydantic) for CPython 3.12, per CPU;
#   .gpu-carry/native-cp312-aarch64/     gpu_check.sh puts the one for its python and CPU on PYTHONPATH
#
# psutil (a C extension) and torch are the machine's own. Usage: bash scripts/build_gpu_carry.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-.gpu-carry}
PY=${VENV_PYTHON:-.venv/bin/python}
PYVER=${GPU_PYVER:-3.12}
ABI=cp${PYVER/./}
[ -x "$PY" ] || { echo "no $PY: run \`make venv\` first" >&2; exit 2; }

# the dependency closure of what sage-llm imports at run time, minus psutil (native, present there) and the hub
# client (only `models pull/search` use it; the check does not)
PURE="typer annotated-doc shellingham rich markdown-it-py mdurl Pygments httpx httpcore h11 anyio idna certifi
      sniffio platformdirs nvidia-ml-py pydantic annotated-types typing-inspection typing_extensions"
pins=$("$PY" - $PURE <<'PYEOF'
import importlib.metadata as md, sys
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass  # not needed by this Python (e.g. sniffio with a recent anyio)
print(" ".join(out))
PYEOF
)
core=$("$PY" -c 'import importlib.metadata as m; print("pydantic_core==" + m.version("pydantic_core"))')

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }  # this machine's pip config is noisy
quiet "$PY" -m pip wheel --disable-pip-version-check -q --no-deps -w "$CARRY/wheels" .
pip_t() { quiet "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-compile --only-binary=:all: \
          --python-version "$PYVER" --implementation cp --target "$@"; }
pip_t "$CARRY/pure" --platform any "$CARRY"/wheels/sage_llm-*.whl $pins
for arch in x86_64 aarch64; do
    pip_t "$CARRY/native-$ABI-$arch" --platform "manylinux2014_$arch" --abi "$ABI" "$core"
done
rm -rf "$CARRY/wheels" "$CARRY"/pure/bin
find "$CARRY" -name '__pycache__' -prune -exec rm -rf {} +
echo "$CARRY: $(du -sh "$CARRY" | cut -f1) ($(du -sb "$CARRY" | cut -f1) bytes); pins: $pins $core"
