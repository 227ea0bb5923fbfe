#!/usr/bin/env bash
# Issue 5's GPU measurements in one short run, for a lent GPU machine (torch 2.11 and transformers
# there, nothing to install): sample.generate vs transformers in bf16 at batch 16/64/256 and the
# SIKeD shape, compile=True vs eager (speed, rows whose greedy tokens match, compile time), and
# where compiled greedy rows part from eager ones (compile_check.py). Weights are seeded
# random ones of SmolLM2-135M's config (same speed): the 257 MB checkpoint cannot travel.
#
# Here, once: put the fixture's config and tokenizer and some GSM8K test questions in .gpu/ (kept
# out of git by .git/info/exclude), then run this through the device tool with carry [".gpu"]:
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/model .gpu/data/gsm8k
#   cp ~/.cache/siked-fixtures/smollm2-135m-instruct/{config.json,tokenizer*.json,*.jinja} .gpu/model/
#   head -300 ../shared/data/gsm8k/test.jsonl > .gpu/data/gsm8k/test.jsonl
#   device run: bash tests/bench/gpu_check.sh   (about 8 minutes on an H200; output also in $OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 SIKED_DATA=.gpu/data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 tests/bench/bench_sample.py --device cuda --random-init --model .gpu/model \
  --cases "${CASES:-greedy,compile,siked}" --reps "${REPS:-1}" 2>&1 | grep -v "Writing model" | tee "${OUT:-/tmp}/bench_cuda.txt"
python3 tests/bench/compile_check.py --model .gpu/model 2>&1 | grep -v "Writing model" \
  | tee "${OUT:-/tmp}/compile_check.txt"
