#!/usr/bin/env bash
# GPU readiness in one command, at most ~7.5 minutes: SFT and DPO on a ~0.5B Qwen2-architecture model built from
# its config (random weights, bf16) with tokens/s, peak memory and MFU, row by row with and without each fast-path
# option (flash attention, padding-free and packed batches, Liger, precomputed reference log-probs) and with what
# the stages choose on this machine; the sample stage with the transformers backend on the GPU; the vLLM backend
# when vllm imports; one summary table of the parts and one of the training rows side by side.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter (default python3)
#
# Needs torch (with CUDA), transformers, trl, datasets and accelerate; nothing else (the sample part runs the
# whole stage where the recipe's dependencies import, else the backend alone; a row whose kernel, flash-attn or
# liger-kernel, does not import is skipped with the reason). Exits 2 at once, saying why, when CUDA or one of those
# is missing; 1 when a part failed or ran out of time (after printing the tables); else 0.
#
# No network: the tokenizer is trained here, the model is built from its config. Every part runs in its own
# process under its own time limit, and the limits shrink to what is left of the budget; a part that fails or
# runs out of time is reported as such and the others still run (a training part keeps the rows it finished).
# GPU_CHECK_SECONDS (default 15) is the training time of each sft and dpo row (six rows each); GPU_CHECK_DIR keeps
# the working files (default: a temporary directory, removed); GPU_CHECK_SMOKE=1 runs a tiny model on the CPU
# (checks the script, measures nothing).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET=430                                  # seconds for all parts; the summary takes a second or two
TRAIN_SECONDS="${GPU_CHECK_SECONDS:-15}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
SMOKE=()
[[ "${GPU_CHECK_SMOKE:-0}" == 1 ]] && SMOKE=(--smoke)

# Fail at once, and clearly, where the check cannot measure anything
"$PY" benchmarks/gpu_check.py preflight --out "${TMPDIR:-/tmp}" ${SMOKE[@]+"${SMOKE[@]}"} || exit 2
OUT="${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$OUT"
START=$(date +%s)

run_part() {  # part, its own limit in seconds
    local part=$1 limit=$2 left
    left=$(( BUDGET - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        echo "{\"status\": \"not run\", \"error\": \"no time left of the ${BUDGET} s budget\"}" > "$OUT/$part.json"
        return
    fi
    echo "== $part (at most ${limit} s)" >&2
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py "$part" --out "$OUT" \
        --seconds "$TRAIN_SECONDS" ${SMOKE[@]+"${SMOKE[@]}"} > "$OUT/$part.log" 2>&1
    local rc=$?
    tail -n 1 "$OUT/$part.log" >&2
    if (( rc == 124 || rc == 137 )); then
        echo "{\"status\": \"timeout\", \"error\": \"killed after ${limit} s (log: $OUT/$part.log)\"}" > "$OUT/$part.json"
    fi
}

run_part env 30
run_part build 60
run_part sft 150
run_part dpo 140
run_part sample 60
run_part vllm 100
echo >&2
"$PY" benchmarks/gpu_check.py summary --out "$OUT"
STATUS=$?
echo "total: $(( $(date +%s) - START )) s"
if [[ -z "${GPU_CHECK_DIR:-}" ]]; then
    rm -rf "$OUT"
else
    rm -rf "$OUT/model" "$OUT/sft" "$OUT"/*-ckpt "$OUT/runs"  # keep the logs and the numbers, not the weights
fi
exit $STATUS
