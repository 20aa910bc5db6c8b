#!/usr/bin/env bash
# The GPU check: the gpu-marked tests, then short GPU benchmarks, in one command that ends in
# under 8 minutes on an H100/H200 and leaves everything under benchmarks/results/gpu/<UTC>-<gpu>/.
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; no internet needed
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # install missing pure-python deps offline
#
# Environment: PYTHON (default python), WHEELS (a folder of wheels for missing packages),
# GPU_CHECK_BUDGET_S (whole-run deadline, default 450 s), OUT (if set, a copy of the results goes
# there: the device tool returns files written under $OUT).
# Exit status: 0 all steps passed; 1 a step failed or timed out; 2 no CUDA device; 3 packages missing.
# Every step runs under `timeout`, bounded by its own cap and by what is left of the deadline, so a
# hang costs one step, never the run; a step that cannot get 20 s is recorded as skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
START="$(date +%s)"
DEADLINE=$((START + BUDGET_S))
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"

say() { printf '[gpu_check %4ds] %s\n' "$(($(date +%s) - START))" "$*"; }

# ---- 1. the machine ---------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || true
else
    say "nvidia-smi not found"
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "no CUDA device visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 || echo "torch not importable")): nothing to check"
    exit 2
fi
GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
SLUG="$(printf '%s' "$GPU_NAME" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/^-*//; s/-*$//')"
RUN_DIR="$ROOT/benchmarks/results/gpu/${STAMP}-${SLUG}"
mkdir -p "$RUN_DIR"
say "results → $RUN_DIR"

# ---- 2. packages ------------------------------------------------------------------------------
# import name → pip name. REQUIRED: imported by the tests and benchmarks run below (the demo archive
# holds JPEG 2000 and RLE files, hence the pylibjpeg decoders). OPTIONAL: only reported.
REQUIRED="torch:torch triton:triton numpy:numpy click:click safetensors:safetensors tokenizers:tokenizers
pydicom:pydicom pylibjpeg:pylibjpeg openjpeg:pylibjpeg-openjpeg rle:pylibjpeg-rle PIL:pillow pyarrow:pyarrow
yaml:pyyaml tqdm:tqdm rich:rich pytest:pytest"
OPTIONAL="tensorrt:tensorrt onnxruntime:onnxruntime transformers:transformers matplotlib:matplotlib
highdicom:highdicom setuptools:setuptools"
missing() {  # prints the pip names of the modules in $1 that do not import
    local pair
    for pair in $1; do
        "$PY" -c "import ${pair%%:*}" >/dev/null 2>&1 || printf '%s ' "${pair#*:}"
    done
}
MISSING="$(missing "$REQUIRED")"
if [ -n "$MISSING" ] && [ -n "${WHEELS:-}" ]; then
    say "missing: $MISSING— installing from $WHEELS (no index)"
    # shellcheck disable=SC2086  # one argument per package
    "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING || say "pip could not install all of them"
    MISSING="$(missing "$REQUIRED")"
fi
OPT_MISSING="$(missing "$OPTIONAL")"
{
    echo "# environment"
    echo "date: $(date -u +%FT%TZ)   host: $(hostname)   cores: $(nproc)"
    "$PY" - <<'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  triton {tv}")
print(f"gpu {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.0f} GiB  x{torch.cuda.device_count()}")
EOF
    echo "missing required: ${MISSING:-none}"
    echo "missing optional: ${OPT_MISSING:-none}"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|pytest|pydicom|pyarrow|safetensors|tokenizers|tensorrt|onnxruntime|transformers) ' || true
} | tee "$RUN_DIR/env.txt"
if [ -n "$MISSING" ]; then
    say "MISSING required Python packages: $MISSING"
    say "carry their wheels and rerun with WHEELS=/path/to/wheels (pip install --no-index --find-links)"
    exit 3
fi

# ---- 3. radflash from this checkout -----------------------------------------------------------
here() {  # radflash imports, and from this checkout (symlinks resolved)
    "$PY" -c 'import os, sys, radflash; r = os.path.realpath; sys.exit(0 if r(radflash.__file__).startswith(r(sys.argv[1]) + os.sep) else 1)' "$ROOT" 2>/dev/null
}
if ! here; then
    say "radflash is not importable from $ROOT: pip install --no-deps --no-build-isolation -e ."
    if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$RUN_DIR/install.log" 2>&1 || ! here; then
        # No setuptools/wheel offline: the same package layout as setup.py, as a symlink tree.
        say "pip install failed (see install.log); using a symlink tree on PYTHONPATH instead"
        SITE="$(mktemp -d)"
        mkdir "$SITE/radflash"
        for entry in "$ROOT"/engine/*; do ln -s "$entry" "$SITE/radflash/"; done
        for sub in kernels training calibration; do ln -s "$ROOT/$sub" "$SITE/radflash/$sub"; done
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        here || { say "radflash still not importable from $ROOT"; exit 3; }
    fi
fi

# ---- 4. steps ---------------------------------------------------------------------------------
STEPS=()
FAILED=0
# step NAME CAP_S LOG CMD...: run CMD under timeout min(CAP_S, time left), log to RUN_DIR/LOG.
step() {
    local name="$1" cap="$2" log="$RUN_DIR/$3" left limit rc=0 t0
    shift 3
    left=$((DEADLINE - $(date +%s)))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        say "$name: skipped (${left}s left of the ${BUDGET_S}s budget)"
        STEPS+=("| $name | skipped: budget spent | 0 | — |")
        FAILED=1
        return 0
    fi
    say "$name (limit ${limit}s): $*"
    t0="$(date +%s)"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local took=$(($(date +%s) - t0)) status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
    fi
    [ "$status" = ok ] || FAILED=1
    say "$name: $status in ${took}s"
    tail -n 3 "$log" | sed 's/^/    /'
    STEPS+=("| $name | $status | $took | \`$(basename "$log")\` |")
}

export PYTHONUNBUFFERED=1
# -o addopts: the repository's addopts name a pytest-benchmark flag; these tests need no plugin.
# Caps (s): tests ~150 expected, kernel bench ~60 (autotuning 8 head shapes), encoder bench ~100
# (one inductor compile of the base encoder per batch size): about 5–6 minutes in all.
step "gpu tests" 200 tests.log \
    "$PY" -m pytest -v -p no:cacheprovider -o addopts="-ra" -m gpu tests/gpu \
    --junitxml="$RUN_DIR/tests.xml" --durations=15
step "kernel bench (Triton vs torch)" 90 bench_kernels.log \
    "$PY" benchmarks/bench_kernels.py --no-compile --reps 10 --csv "$RUN_DIR/kernels.csv"
step "encoder bench (eager vs compile, base@518, B=1,32)" 140 bench_encoder.log \
    "$PY" benchmarks/bench_encoder_gpu.py --backends eager,compile --batch-sizes 1,32 \
    --append "$RUN_DIR/encoder.md"

# ---- 5. summary -------------------------------------------------------------------------------
{
    echo "# GPU check ${STAMP} on ${GPU_NAME}"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh\` (budget ${BUDGET_S}s, took $(($(date +%s) - START))s)."
    echo
    echo '```'
    cat "$RUN_DIR/env.txt"
    echo '```'
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    "$PY" - "$RUN_DIR" <<'EOF' || echo "(could not summarise the step outputs)"
import csv, sys, xml.etree.ElementTree as ET
from pathlib import Path
run = Path(sys.argv[1])
junit = run / "tests.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib
    print(f"## Tests\n\n{a.get('tests')} tests: {a.get('failures')} failed, {a.get('errors')} errors, "
          f"{a.get('skipped')} skipped, {float(a.get('time', 0)):.0f} s\n")
    for case in suite.iter("testcase"):
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                print(f"- {tag}: `{case.get('name')}` {msg}")
    print()
kernels = run / "kernels.csv"
if kernels.is_file():
    print("## Kernels (median ms; speed-up vs torch eager; fraction of copy bandwidth)\n")
    print("| shape | impl | ms | × eager | of copy BW |\n|---|---|---|---|---|")
    for r in csv.DictReader(kernels.open()):
        print(f"| {r['shape']} | {r['impl']} | {r['ms']} | {r['speedup_vs_eager']} | {r['frac_copy_bw']} |")
    print()
encoder = run / "encoder.md"
if encoder.is_file():
    print("## Encoder\n")
    print(encoder.read_text())
EOF
} >"$RUN_DIR/summary.md"
cat "$RUN_DIR/summary.md"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_check"
    cp -r "$RUN_DIR" "$OUT/gpu_check/"
    say "copied the results to $OUT/gpu_check/$(basename "$RUN_DIR")"
fi
say "done: $([ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED') → $RUN_DIR/summary.md"
exit "$FAILED"
