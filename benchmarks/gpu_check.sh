#!/usr/bin/env bash
# The GPU check: one command on a machine with one GPU, at most 8 minutes, ONE JSON summary on stdout.
#
#   bash benchmarks/gpu_check.sh                       # run every step (without a GPU: all skipped, in seconds)
#   bash benchmarks/gpu_check.sh --prepare DIR         # first install the wheels carried in DIR (see --pack)
#   bash benchmarks/gpu_check.sh --pack DIR            # HERE, with pip and the internet: fill DIR for a bare GPU box
#
# Steps (benchmarks/gpu_steps.py), each independent, each under its own `timeout` and the 8-minute budget:
#   probe          driver, CUDA, cuDNN, NCCL, GPU, ONNX Runtime providers, FAISS (the "environment")
#   pytest-gpu     pytest -m gpu (tests/test_gpu.py)
#   data           a synthetic 32 px colour shard set (mocoplus ingest)
#   train-bf16     60 bf16 steps of cifar-resnet18 under torchrun (one process; pytest-gpu has NCCL)
#   throughput     cifar-resnet18 images/s: model only, stream only, end to end, and which one limits
#   export-parity  mocoplus export of that run; ONNX Runtime CUDA against CPU provider (cosine)
#   embed-cuda     mocoplus embed --provider cuda: images/s
#   faiss-gpu      mocoplus index --gpu (ivf, ivfpq) on 200k vectors; search on GPU: recall@10 against exact
#   serve-cuda     mocoplus serve --provider cuda under a short load: requests/s, p50/p95
# Each step reports "ok", "failed" (with why), "skipped" (no GPU, or a step it needs did not finish) or
# "unverifiable" (a package it needs is missing: onnxruntime-gpu, faiss-gpu, the web stack, ...).
#
# What a bare GPU machine needs beside torch: webdataset and braceexpand (training, embedding), the service's
# web stack (fastapi, uvicorn, python-multipart, fastapi-offline, httptools), onnxruntime-gpu and faiss-gpu, and
# for pytest-gpu a Fashion-MNIST slice. `--pack DIR` downloads the small wheels and writes the slice (about
# 5 MB in all); onnxruntime-gpu and faiss-gpu wheels are hundreds of MB each: put them in DIR where they can
# travel, else their steps report "unverifiable". `--prepare DIR` installs DIR/*.whl into WORK/site (no index,
# no dependencies) and points MOCOPLUS_FASHION_MNIST_DIR at DIR/fashion-mnist.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/mocoplus-gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for all steps together (the machine's 8 minutes, with a margin)
PREPARE="" PACK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) PREPARE=$2; shift 2 ;;
        --pack) PACK=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--prepare DIR | --pack DIR] [--work DIR] [--budget S]" >&2; exit 2 ;;
    esac
done

if [ -n "$PACK" ]; then  # run where pip reaches an index: the wheels a bare GPU machine lacks, and the data
    mkdir -p "$PACK"
    $PY -m pip download --quiet --dest "$PACK" --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any "webdataset>=0.2.90" "braceexpand>=0.1.7" "fastapi>=0.110,<0.151" "uvicorn>=0.29" \
        "python-multipart>=0.0.9" "fastapi-offline>=1.7" "httptools>=0.6" || echo "pack: pip download failed" >&2
    # what the GPU machines already hold (their torch image): never carried, never replaced
    for name in numpy pyyaml PyYAML typing_extensions anyio idna click h11 pillow annotated_doc; do
        rm -f "$PACK"/"$name"-*.whl "$PACK"/"$(echo "$name" | tr '[:upper:]' '[:lower:]')"-*.whl
    done
    PYTHONPATH=tests:. $PY -c "
import sys; from pathlib import Path
from datasets import write_fashion_mnist_slice
from pipeline.data.fashion_mnist import DEFAULT_DIR, find_fashion_mnist
write_fashion_mnist_slice(find_fashion_mnist(DEFAULT_DIR), Path(sys.argv[1]) / 'fashion-mnist', train=600, test=200)
" "$PACK" || echo "pack: no Fashion-MNIST here to slice" >&2
    du -sh "$PACK" >&2
    ls "$PACK" >&2
    exit 0
fi

mkdir -p "$WORK/results"
rm -f "$WORK"/results/*.json "$WORK/probe.json"
STARTED=$(date +%s)

# --- preparation: carried wheels and data, or nothing -----------------------------------------------
prepare_json='{"status": "skipped", "reason": "not asked for (--prepare DIR installs the wheels carried in DIR)"}'
if [ -n "$PREPARE" ]; then
    if ls "$PREPARE"/*.whl >/dev/null 2>&1; then
        if $PY -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$WORK/site" \
            "$PREPARE"/*.whl >"$WORK/prepare.log" 2>&1; then
            export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
            installed=$(cd "$PREPARE" && ls ./*.whl | sed 's|^\./||; s|-.*||' | sort -u | tr '\n' ' ')
            prepare_json="{\"status\": \"ok\", \"installed\": \"$installed\"}"
        else
            prepare_json="{\"status\": \"failed\", \"reason\": \"pip install of $PREPARE/*.whl failed (see $WORK/prepare.log)\"}"
        fi
    else
        prepare_json="{\"status\": \"unverifiable\", \"reason\": \"no wheels in $PREPARE\"}"
    fi
    if [ -d "$PREPARE/fashion-mnist" ]; then
        export MOCOPLUS_FASHION_MNIST_DIR="$PREPARE/fashion-mnist"
    fi
fi
echo "$prepare_json" >"$WORK/results/prepare.json"

# --- the steps --------------------------------------------------------------------------------------
ORDER=""
run_step() {  # NAME CAP [ARGS...]: the step under `timeout`, its JSON (or why there is none) into results/
    local name=$1 cap=$2
    shift 2
    ORDER="$ORDER $name"
    local left=$((BUDGET - ($(date +%s) - STARTED) - 5))
    local limit=$((cap < left ? cap : left))
    local out="$WORK/results/$name.json"
    if [ "$limit" -lt 10 ]; then
        echo "{\"status\": \"skipped\", \"reason\": \"the check's ${BUDGET} s budget is spent\"}" >"$out"
        return
    fi
    echo "gpu_check: $name (up to ${limit} s)" >&2
    local begin
    begin=$(date +%s)
    timeout -k 5 "$limit" $PY benchmarks/gpu_steps.py "$name" --work "$WORK" --timeout $((limit - 5)) "$@" \
        >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    local last
    last=$(tail -n 1 "$WORK/$name.out" 2>/dev/null)
    if [ $rc -eq 0 ] && echo "$last" | $PY -c "import json,sys; json.loads(sys.stdin.read())" 2>/dev/null; then
        echo "$last" >"$out"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "{\"status\": \"failed\", \"reason\": \"timed out after ${limit} s\"}" >"$out"
    else
        $PY - "$WORK/$name.err" "$rc" >"$out" <<'EOF'
import json, sys
from pathlib import Path
text = Path(sys.argv[1]).read_text(errors="replace") if Path(sys.argv[1]).exists() else ""
print(json.dumps({"status": "failed", "reason": f"exit {sys.argv[2]}: " + " | ".join(text.strip().splitlines()[-5:])}))
EOF
    fi
    $PY - "$out" "$(($(date +%s) - begin))" <<'EOF'
import json, sys
path = sys.argv[1]
result = json.load(open(path))
result["seconds"] = result.get("seconds", int(sys.argv[2]))
json.dump(result, open(path, "w"))
EOF
}

run_step probe 60
run_step pytest-gpu 200
run_step data 60
run_step train-bf16 90
run_step throughput 90
run_step export-parity 60
run_step embed-cuda 45
run_step faiss-gpu 90
run_step serve-cuda 60

# --- one JSON summary -------------------------------------------------------------------------------
$PY - "$WORK" "$(($(date +%s) - STARTED))" "$ORDER" <<'EOF'
import json, sys
from pathlib import Path
work, seconds, order = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split()
def load(name):
    try:
        return json.loads((work / "results" / f"{name}.json").read_text())
    except (OSError, ValueError) as error:
        return {"status": "failed", "reason": f"no result ({error})"}
steps = {name: load(name) for name in order}
environment = steps.get("probe", {}).pop("environment", None)
try:
    environment = environment or json.loads((work / "probe.json").read_text())
except (OSError, ValueError):
    pass
counts = {}
for result in steps.values():
    counts[result.get("status", "failed")] = counts.get(result.get("status", "failed"), 0) + 1
print(json.dumps({
    "check": "mocoplus gpu_check",
    "seconds": seconds,
    "environment": environment,
    "prepare": load("prepare"),
    "steps": steps,
    "counts": counts,
}, indent=2))
EOF
