#!/usr/bin/env bash
# GPU benchmark for one H100/H200: random-weight GPT-J 6B, our engine against transformers on the
# same weights, bf16 and int8, the paged cache at two context limits, plus the roofline (weights, and
# weights + live KV). Uses only what the device machine has (JAX with CUDA, transformers, torch; no
# Ray, no network). Budget: about 10 minutes.
#   bash bench/gpu.sh            results in $OUT (or ./out): *.jsonl, and a log
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX and torch share the GPU in one process: no up-front 75% grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import jax, torch, transformers; print("jax", jax.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/device.txt"

common=(--checkpoint gptj-6b --dtype bfloat16 --prompt-len 512 --new-tokens 128 --repeats 2 --json)
# bf16: engine and transformers (--compare-hf) each at batch 1, 16 and 64 (the 6x goal is at batch 64)
timeout 330 python3 -m bench.engine "${common[@]}" --batch-sizes 1,16,64 --compare-hf | tee "$OUT/engine_bf16.jsonl"
# int8 weights: the 1.6x (batch 1) and 1.3x (batch 16) goals against the bf16 rows above
timeout 150 python3 -m bench.engine "${common[@]}" --batch-sizes 1,16 --quantize int8 | tee "$OUT/engine_int8.jsonl"
# paged KV: batch 64 at 512 + 128 with sequences allowed 2048 positions against 640; the decode step
# should cost the same (within 15%): it reads the pages in use, not max_cache_len
for L in 640 2048; do
  timeout 150 python3 -m bench.engine "${common[@]}" --batch-sizes 64 --max-cache-len $L | tee -a "$OUT/engine_paged.jsonl"
done
cat "$OUT/engine_bf16.jsonl" "$OUT/engine_paged.jsonl" > "$OUT/engine_all.jsonl"
python3 -m bench.roofline --checkpoint gptj-6b --dtype bfloat16 --engine-jsonl "$OUT/engine_all.jsonl" | tee "$OUT/roofline.jsonl"
