"""model.engine.buckets: which static shape a size is padded to (no JAX)."""

from model.engine.buckets import fit_prompt_buckets, smallest_fitting


def test_smallest_fitting_bucket():
    assert smallest_fitting(1, (16, 64)) == 16
    assert smallest_fitting(16, (16, 64)) == 16
    assert smallest_fitting(17, (16, 64)) == 64
    assert smallest_fitting(65, (16, 64)) is None


def test_prompt_buckets_fit_the_context():
    assert fit_prompt_buckets((32, 128, 512), 2048) == (32, 128, 512)
    assert fit_prompt_buckets((32, 128, 512), 256) == (32, 128, 256)  # a small checkpoint still serves
    assert fit_prompt_buckets((512, 1024), 128) == (128,)
