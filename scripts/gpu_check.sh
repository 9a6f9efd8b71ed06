#!/usr/bin/env bash
# The GPU check on a lent GPU machine (docs/gpu.md, "Verifying on a real GPU"): scripts/gpu_check.py with the packages
# carried in .gpu-carry/ (`make gpu-carry`), results under $OUT. Extra arguments go to gpu_check.py (e.g. --fake).
#
#   PYTHON            the interpreter (default python3: the machine's, with torch and CUDA)
#   OUT               results folder (default ./gpu-check-out)
#   GPU_CARRY         carried packages (default .gpu-carry; absent: the interpreter's own packages are used)
#   GPU_CHECK_BUDGET  seconds for the whole check (default 240); a hard stop 30 s later
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${GPU_CARRY:-.gpu-carry}
OUT=${OUT:-$PWD/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET:-240}
mkdir -p "$OUT"
path=""
if [ -d "$CARRY/pure" ]; then
    abi=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    native="$PWD/$CARRY/native-$abi-$(uname -m)"
    path="$PWD/$CARRY/pure"
    if [ -d "$native" ]; then
        path="$path:$native"
    else
        echo "gpu_check.sh: no $native: pydantic-core must come from $PY itself" >&2
    fi
else
    echo "gpu_check.sh: no $CARRY/pure: using the packages installed for $PY" >&2
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
timeout --kill-after=10 $((${BUDGET%.*} + 30)) "$PY" scripts/gpu_check.py --out "$OUT" --budget "$BUDGET" "$@"
code=$?
[ $code -eq 124 ] && echo "gpu_check.sh: hard stop after $((${BUDGET%.*} + 30)) s; partial results in $OUT" >&2
exit $code
