#!/usr/bin/env bash
# Run the whole benchmark suite on a bigger machine (e.g. a 16-core device
# machine) and leave everything under $OUT: results.json, results.md,
# times.png, speedup.png, the powerpool profiles, and the log.
#
#   OUT=/some/dir bash benchmarks/device_run.sh [extra python -m benchmarks options]
#
# It uses the repository's .venv when it works there, else the python3 on PATH,
# which then needs powerpool's runtime and bench dependencies. The lent GPU
# machines' image (Python 3.12) already has numpy, matplotlib, joblib, psutil,
# cloudpickle, threadpoolctl, tqdm and click, but not mpire, dask, distributed
# (nor their tornado, tblib, zict, partd, locket): download those as cp312
# manylinux wheels into .whl/ (see the device README), carry .whl, and this
# script installs them offline first. A contender whose package is missing is
# reported as "error" in the table, and the rest still runs. The worker sweep
# covers 1, 2, 4, 8, 16 (and 32 where the cores allow): the 16-core target.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out-device}"
mkdir -p "$OUT"

if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import numpy" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
    if [[ -d .whl ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
# powerpool from this checkout, whether or not it is installed.
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

CORES="$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')"
SWEEP="1,2,4,8,16"
if (( CORES >= 32 )); then SWEEP="$SWEEP,32"; fi

status=0
{
    echo "== $(date -u +%FT%TZ) on $(hostname), $CORES cores"
    "$PY" -V
    "$PY" -m benchmarks --out "$OUT" --workers-sweep "$SWEEP" --profile-powerpool "$@"
} 2>&1 | tee "$OUT/log.txt" || status=$?
echo "== benchmarks exit status $status" | tee -a "$OUT/log.txt"
exit "$status"
