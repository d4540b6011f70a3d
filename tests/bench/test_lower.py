"""bench/lower.py: the paged engine's functions lowered for TPU and CUDA on this CPU-only machine, at
GPT-J's real per-layer shapes (16 heads x 256, int8 weights, 4-way tensor parallel) with small
buckets, and the module inspection it reports."""

import json

import pytest

from bench import lower

SMALL = ["--prompt-buckets", "32", "--prefill-batch-buckets", "1", "--slots", "4", "--max-cache-len", "64",
         "--page-size", "16", "--kv-pages", "8"]
# at least: prefill and insert of the one prompt bucket, decode over 1, 2 and 4 pages of 16 (64 positions)
FUNCTIONS = {"prefill_t32_b1", "insert_t32_b1", "decode_p1", "decode_p2", "decode_p4"}
POOL_PER_CHIP = "tensor<4x9x16x256xbf16>"  # 16 heads / 4 chips, 8 pages + the trash page, 16 tokens, head_dim 256


def run(capsys, tmp_path, *flags, checkpoint="gptj-6b"):
    code = lower.main(["--checkpoint", checkpoint, "--dtype", "bfloat16", "--quantize", "int8", "--mesh", "4",
                       "--out", str(tmp_path), *SMALL, *flags])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.mark.parametrize("platform, kernel", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_lowers_every_function_with_the_platform_kernel_in_decode(capsys, tmp_path, platform, kernel):
    code, rows, _ = run(capsys, tmp_path, "--platform", platform)
    assert code == 0
    names = [r["function"] for r in rows]
    assert FUNCTIONS <= set(names) and len(set(names)) == len(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.mlir" for n in names)
    for row in rows:
        assert set(row) == {"platform", "function", "num_partitions", "custom_calls", "bytes"}
        assert row["platform"] == platform and row["num_partitions"] == 4
        mlir = (tmp_path / f"{row['function']}.mlir").read_text()
        assert row["bytes"] == len(mlir.encode()) and row["custom_calls"] == sorted(set(row["custom_calls"]))
        assert (kernel in row["custom_calls"]) == row["function"].startswith("decode"), row
        assert "mhlo.num_partitions = 4" in mlir
    assert POOL_PER_CHIP in (tmp_path / "decode_p4.mlir").read_text()


@pytest.mark.parametrize("checkpoint, flags, reason", [
    ("gptj-6b", ["--kv-cache-dtype", "int8"], "the Pallas TPU kernel expands int8 scales"),
    ("tiny", [], "the Pallas TPU kernel needs head_dim a multiple of 128"),  # head_dim 16
])
def test_tpu_falls_back_to_the_reference_and_says_why(capsys, tmp_path, checkpoint, flags, reason):
    code, rows, err = run(capsys, tmp_path, "--platform", "tpu", *flags, checkpoint=checkpoint)
    assert code == 0
    assert f"decode attention reference: {reason}" in err
    decode = [r for r in rows if r["function"].startswith("decode")]
    assert decode and all("tpu_custom_call" not in r["custom_calls"] for r in decode)


def test_defaults_come_from_the_gke_overlay():
    args = lower.overlay_args("gke-tpu")
    assert (args["mesh"], args["dtype"], args["quantize"], args["slots"], args["max_cache_len"], args["page_size"]) == (
        4, "bfloat16", "int8", 32, 2048, 64)
    from model.nn.config import PRESETS

    config = lower.engine_config(args, PRESETS["gptj-6b"])
    assert config.prompt_buckets == tuple(args["prompt_buckets"])
    assert config.batch_buckets == tuple(args["prefill_batch_buckets"])
    assert (config.slots, config.page_size) == (32, 64)
    assert config.num_pages == 32 * 2048 // 64  # the dense equivalent: kv_pages is not set on GKE
    given = lower.engine_config(dict(args, kv_pages=100), PRESETS["gptj-6b"])
    assert given.num_pages == 100


def test_module_inspection():
    pretty = ('%0 = stablehlo.custom_call @tpu_custom_call(%arg0) {backend_config = ""}\n'
              '%1 = stablehlo.custom_call @__gpu$xla.gpu.triton(%0)\n%2 = stablehlo.custom_call @tpu_custom_call(%1)')
    generic = '"stablehlo.custom_call"(%0) <{call_target_name = "Sharding"}>'
    assert lower.custom_calls(pretty + "\n" + generic) == ["Sharding", "__gpu$xla.gpu.triton", "tpu_custom_call"]
    assert lower.num_partitions("module @m attributes {mhlo.num_partitions = 4 : i32, mhlo.num_replicas = 1}") == 4
    assert lower.num_partitions("module @m {}") == 1


def test_problems_name_the_function():
    rows = [{"function": "decode_p1", "num_partitions": 4, "custom_calls": []},
            {"function": "prefill_t32_b1", "num_partitions": 1, "custom_calls": []}]
    assert lower.problems(rows, "pallas_tpu", 4) == [
        "decode_p1: no tpu_custom_call custom call (pallas_tpu decode attention)",
        "prefill_t32_b1: num_partitions 1, expected 4"]
    assert lower.problems(rows[:1], "reference", 4) == []
