#!/usr/bin/env bash
# The GPU measurements of issues #4 (dVAE encoding), #5 (prior MFU, cost of the masks), #6
# (sampling against the bandwidth bound) and #31 (pretrained tokenizers against their authors'
# code), plus the CUDA-only tests, in one run on one H100/H200, for a session lent a device. Most important first: a run cut short keeps what it measured.
# Needs torch, numpy, pyarrow, pillow, safetensors, pytest (the device image has them) and
# pydantic (it has not): fetch its wheels here first,
#
#     .venv/bin/pip download --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d .wheels pydantic pyyaml einops diffusers
#     .venv/bin/pip download --no-deps -d .wheels dall-e taming-transformers-rom1504 attrs
#
# (the last three: the pretrained tokenizers' authors' code, which `tokenizers-pretrained` runs beside ours)
#
# and, for the anchors beside ours (../shared does not travel), copy them into the checkout:
#
#     rm -rf .anchors && cp -r ../shared/anchors .anchors
#
# then run(command="bash bench/gpu_check.sh", carry=[".wheels", ".anchors"], timeout_s=560).
# Results: one JSON line per measurement in $OUT/results.jsonl, everything else in $OUT/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
log="$OUT/log.txt"
if ! "$PY" -c "import pydantic" 2>/dev/null && [[ -d .wheels ]]; then
    "$PY" -m pip install -q --no-index --find-links .wheels pydantic >>"$log" 2>&1
fi
if ! "$PY" -c "import dall_e, taming, diffusers" 2>/dev/null && [[ -d .wheels ]]; then
    "$PY" -m pip install -q --no-index --find-links .wheels pyyaml einops diffusers attrs >>"$log" 2>&1
    "$PY" -m pip install -q --no-index --no-deps --find-links .wheels dall-e taming-transformers-rom1504 >>"$log" 2>&1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch; print(torch.__version__)"; } >>"$log" 2>&1

# measure NAME SECONDS COMMAND...: the command's JSON line into results.jsonl, tagged with NAME
measure() {
    local name="$1" limit="$2" line
    shift 2
    echo "== $name: $*" >>"$log"
    line="$(timeout "$limit" "$@" 2>>"$log" | tail -n 1)"
    echo "{\"check\": \"$name\", \"exit\": $?, \"result\": ${line:-null}}" >>"$OUT/results.jsonl"
    echo "$name done" >&2
}

PAPER_PRIOR=(--layers 24 --d-model 1024 --heads 16 --text-len 256 --grid 32 --text-vocab 16384 --image-vocab 8192)
echo "== CUDA tests" >>"$log"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -p source_tree tests/components/test_prior.py >>"$log" 2>&1
echo "{\"check\": \"cuda-tests\", \"exit\": $?}" >>"$OUT/results.jsonl"
measure prior-paper-masks 150 "$PY" bench/prior.py "${PAPER_PRIOR[@]}" --batch 16 --steps 10 --precision bf16 --compile
measure prior-dense 120 "$PY" bench/prior.py "${PAPER_PRIOR[@]}" --batch 16 --steps 10 --precision bf16 --compile \
    --attention dense
measure sample 100 "$PY" bench/sample.py "${PAPER_PRIOR[@]}" --batch 128 --skip-recompute
measure dvae-paper 80 "$PY" bench/dvae.py --preset paper --batch 8 --encode-batch 128 --steps 10
measure tokenizers-pretrained 120 "$PY" bench/image_tokenizers.py --pretrained --batch 32 --repeats 5 --device cuda
measure attention 90 "$PY" bench/attention.py --batch 8 --heads 16 --head-dim 64 --text-len 256 --grid 32
if [[ -f .anchors/gpu_anchor.py ]]; then  # the reference GPT and the anchors' attention timings, same batch
    echo "== anchors" >>"$log"
    ANCHOR_BATCH=16 timeout 150 "$PY" .anchors/gpu_anchor.py >>"$OUT/anchor.jsonl" 2>>"$log"
    echo "{\"check\": \"anchor\", \"exit\": $?}" >>"$OUT/results.jsonl"
fi
measure prior-paper-masks-flex 120 "$PY" bench/prior.py "${PAPER_PRIOR[@]}" --batch 16 --steps 10 --precision bf16 \
    --compile --attention-backend flex
tail -n 5 "$log" >&2
