#!/usr/bin/env bash
# GPU benchmark for one H100/H200: random-weight GPT-J 6B, our engine against transformers on the
# same weights, bf16 and int8, the paged cache at two context limits, plus the roofline (weights, and
# weights + live KV). Uses only what the device machine has (JAX with CUDA, transformers, torch; no
# Ray, no network). Budget: about 10 minutes, and about 12 more for the MLPerf part.
#   bash bench/gpu.sh            results in $OUT (or ./out): *.jsonl, and a log
#   bash bench/gpu.sh mlperf     only the MLPerf GPT-J part (the end of this file)
set -euo pipefail
part=${1:-all}
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX and torch share the GPU in one process: no up-front 75% grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import jax, torch, transformers; print("jax", jax.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/device.txt"

if [ "$part" != mlperf ]; then
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
fi

# MLPerf GPT-J Offline through LoadGen (bench.mlperf, engine backend: the replica's driver, no Ray),
# GPT-J 6B with bf16 and with int8 weights, MLPerf's generation (4 beams, early stopping, 30-128 new
# tokens), 512 synthetic CNN/DailyMail samples: a short run (MLPerf's is 13,368 samples over 600 s),
# so LoadGen calls it INVALID; samples/s is the figure. Anchor: one H200 with TensorRT-LLM, 30.76
# samples/s (goal >= 30); TPU v5e x4 with Saxml int8, 10.15. Saxml's shape: 32 prompts x 4 beams
# decoded together, buckets 512 / 1024 / 1919, whole-prompt prefill. bench.mlperf also needs
# mlcommons-loadgen, pydantic and pyyaml (the project's dependencies); a device without network gets
# them carried as wheels: pip download -d wheels mlcommons-loadgen pydantic pyyaml, carry wheels/.
python3 -c "import mlperf_loadgen, pydantic, yaml" 2>/dev/null \
  || pip install --no-index --find-links wheels mlcommons-loadgen pydantic pyyaml
for q in none int8; do
  args="{\"dtype\": \"bfloat16\", \"quantize\": \"$q\", \"slots\": 128, \"batch_max_size\": 128, \"page_size\": 64,
         \"prefill_batch_buckets\": [1, 4, 16], \"prefill_chunk_tokens\": null}"
  timeout 600 python3 -m bench.mlperf --scenario Offline --backend engine --checkpoint gptj-6b --count 512 \
    --duration 60 --args "$args" --out "$OUT/mlperf_offline_$q" | tee -a "$OUT/mlperf.jsonl"
done
# The cost line set beside these (samples per dollar on TPU v5e, projected): bench.roofline --mlperf-requests,
# docs/BENCHMARKS.md.
