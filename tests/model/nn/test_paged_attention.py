"""model/nn/paged_attention.py: the reference against `layers.attention` over the equivalent dense
cache, the Pallas TPU and GPU kernels (interpret mode, one device) against the reference, the
per-platform choice, and the kernels' lowering for TPU and CUDA through jax.export on this CPU box."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding, PartitionSpec as P

from model.nn import layers, quant
from model.nn.paged_attention import (IMPLS, TPU_CUSTOM_CALL, TPU_INT8_FALLBACK, TRITON_CUSTOM_CALL, choose_impl,
                                     paged_attention)
from model.nn.quant import QuantArray
from model.nn.sharding import TP

PAGE = 16


def random_paged_case(seed, *, batch, heads, head_dim, n_pages, lengths, int8=False):
    """A random dense cache [B, N, S=n*PAGE, H] and the same cache scattered into a pool through a
    random block table. Row b's pages are the first cdiv(length, PAGE) table entries (the last one
    partially filled, its tail holding the dense cache's finite leftovers); the remaining entries are
    0. Page 0 and the pool's unallocated pages hold finite garbage, which must never reach an output.
    Returns q, (k_dense, v_dense), (k_pages, v_pages), lengths, block_tables; int8 caches as
    QuantArrays quantized per token and head (dense and pool hold the same values and scales)."""
    rng = np.random.default_rng(seed)
    seq = n_pages * PAGE
    used = [-(-length // PAGE) for length in lengths]
    n_pool = sum(used) + 3  # page 0, the used pages, two never allocated
    page_ids = rng.permutation(np.arange(1, n_pool))
    block_tables = np.zeros((batch, n_pages), np.int32)
    start = 0
    for b, count in enumerate(used):
        block_tables[b, :count] = page_ids[start:start + count]
        start += count

    def to_pool(dense, garbage_shape):  # dense [B, N, S, ...] -> pool [N, P, PAGE, ...]
        pool = rng.normal(size=(heads, n_pool, PAGE) + garbage_shape).astype(dense.dtype)
        for b, count in enumerate(used):
            for j in range(count):
                pool[:, block_tables[b, j]] = dense[b, :, j * PAGE:(j + 1) * PAGE]
        return pool

    q = rng.normal(size=(batch, heads, head_dim)).astype(np.float32)
    dense, pages = [], []
    for _ in "kv":
        x = rng.normal(size=(batch, heads, seq, head_dim)).astype(np.float32)
        if int8:
            qx = quant.quantize(x, axis=-1, xp=np)
            dense.append(QuantArray(jnp.asarray(qx.values), jnp.asarray(qx.scale)))
            pages.append(QuantArray(jnp.asarray(to_pool(np.asarray(qx.values), (head_dim,))),
                                    jnp.asarray(np.abs(to_pool(np.asarray(qx.scale), ())))))
        else:
            dense.append(jnp.asarray(x))
            pages.append(jnp.asarray(to_pool(x, (head_dim,))))
    return (jnp.asarray(q), tuple(dense), tuple(pages), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(block_tables))


def dense_attention(q, k, v, lengths):
    """The dense engine's attention for one query per row over positions 0..length-1: [B, N, H]."""
    seq = k.shape[2]
    allowed = (jnp.arange(seq)[None, :] < lengths[:, None])[:, None, :]  # [B, T=1, S]
    return layers.attention(q[:, None], k, v, allowed)[:, 0]


LENGTHS = [0, 1, 17, 40, 64]  # empty, one token, partial last pages, exactly full pages


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_reference_equals_dense_attention(int8):
    q, (k, v), (k_pages, v_pages), lengths, block_tables = random_paged_case(
        0, batch=5, heads=3, head_dim=32, n_pages=4, lengths=LENGTHS, int8=int8)
    out = jax.jit(paged_attention)(q, k_pages, v_pages, lengths, block_tables)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = dense_attention(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out[1:]), np.asarray(expected[1:]), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out[0]) == 0)  # the length-0 row


def test_reference_with_a_larger_bucket_than_needed():
    """Doubling the table with trash-page entries (a larger page-count bucket) changes nothing."""
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        1, batch=5, heads=2, head_dim=16, n_pages=4, lengths=LENGTHS)
    wider = jnp.concatenate([block_tables, jnp.zeros_like(block_tables)], axis=1)
    np.testing.assert_allclose(np.asarray(paged_attention(q, k_pages, v_pages, lengths, wider)),
                               np.asarray(paged_attention(q, k_pages, v_pages, lengths, block_tables)),
                               atol=1e-6)


def bf16_rounded(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("n_pages", [6, 16])  # compute blocks of 2 pages x 3, 8 pages x 2
def test_pallas_tpu_interpret_equals_reference_on_bf16_rounded_kv(n_pages):
    """The TPU kernel converts every loaded K and V block to bfloat16 and keeps q, the scores, the
    softmax and the accumulation in float32 (interpret mode runs those as written). So on float32
    pages it equals the reference on the bfloat16-rounded pages to float32 rounding (measured
    ~2e-7; asserted at the issue's 1e-5), while against the unrounded reference it is off by ~5e-3
    (asserted below, so that a kernel change which stops rounding K/V is noticed). The real TPU's
    MXU precision for these dots is not covered here."""
    lengths = [0, 5, 37, 64, n_pages * PAGE - 3]
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        2, batch=5, heads=2, head_dim=256, n_pages=n_pages, lengths=lengths)
    out = paged_attention(q, k_pages, v_pages, lengths, block_tables, impl="pallas_tpu", interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    rounded = paged_attention(q, bf16_rounded(k_pages), bf16_rounded(v_pages), lengths, block_tables)
    np.testing.assert_allclose(np.asarray(out), np.asarray(rounded), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out[0]) == 0)
    unrounded = paged_attention(q, k_pages, v_pages, lengths, block_tables)
    assert float(jnp.abs(out - unrounded).max()) > 1e-4


def test_pallas_tpu_refuses_int8_pages_and_head_dims_it_cannot_lower():
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        3, batch=2, heads=2, head_dim=128, n_pages=2, lengths=[3, 20], int8=True)
    with pytest.raises(ValueError, match="expands int8 scales"):
        paged_attention(q, k_pages, v_pages, lengths, block_tables, impl="pallas_tpu", interpret=True)
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        3, batch=2, heads=2, head_dim=64, n_pages=2, lengths=[3, 20])
    with pytest.raises(ValueError, match="head_dim a multiple of 128"):
        paged_attention(q, k_pages, v_pages, lengths, block_tables, impl="pallas_tpu", interpret=True)


@pytest.mark.parametrize("n_pages", [1, 6, 16])  # key splits x pages per block: 1x1, 2x1, 8x2
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_pallas_gpu_interpret_equals_reference(n_pages, int8):
    lengths = [0, 1, 9, n_pages * PAGE - 7, n_pages * PAGE]
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        4, batch=5, heads=2, head_dim=64, n_pages=n_pages, lengths=lengths, int8=int8)
    out = paged_attention(q, k_pages, v_pages, lengths, block_tables, impl="pallas_gpu", interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = paged_attention(q, k_pages, v_pages, lengths, block_tables)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out[0]) == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_in_bfloat16_out(impl):
    """The engine's activation dtype: every implementation returns bfloat16 and stays within bfloat16
    rounding of the float32 computation on the same bfloat16 values (output rounding is up to 2e-3
    here; the reference and the GPU kernel also round the probabilities to bfloat16 before the V
    contraction, as `layers.attention` does: measured 2e-3..4e-3)."""
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        6, batch=3, heads=2, head_dim=256, n_pages=8, lengths=[0, 30, 128])
    q, k_pages, v_pages = (x.astype(jnp.bfloat16) for x in (q, k_pages, v_pages))
    out = paged_attention(q, k_pages, v_pages, lengths, block_tables, impl=impl, interpret=True)
    assert out.dtype == jnp.bfloat16
    as_f32 = [x.astype(jnp.float32) for x in (q, k_pages, v_pages)]
    expected = paged_attention(*as_f32, lengths, block_tables)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(expected), atol=1e-2)
    assert np.all(np.asarray(out[0].astype(jnp.float32)) == 0)


def test_choose_impl():
    assert choose_impl("cpu", kv_int8=False) == ("reference", None)
    assert choose_impl("cpu", kv_int8=True) == ("reference", None)
    assert choose_impl("tpu", kv_int8=False) == ("pallas_tpu", None)
    assert choose_impl("tpu", kv_int8=True) == ("reference", TPU_INT8_FALLBACK)
    assert choose_impl("tpu", kv_int8=False, head_dim=256) == ("pallas_tpu", None)
    impl, reason = choose_impl("tpu", kv_int8=False, head_dim=16)  # the tiny preset
    assert impl == "reference" and "head_dim a multiple of 128" in reason
    for platform in ("gpu", "cuda"):
        for kv_int8 in (False, True):
            assert choose_impl(platform, kv_int8) == ("pallas_gpu", None)
    assert {choose_impl(p, i)[0] for p in ("cpu", "tpu", "gpu") for i in (False, True)} <= set(IMPLS)


def test_unknown_impl_is_refused():
    q, _, (k_pages, v_pages), lengths, block_tables = random_paged_case(
        5, batch=1, heads=1, head_dim=16, n_pages=1, lengths=[3])
    with pytest.raises(ValueError, match="unknown paged attention impl 'triton'"):
        paged_attention(q, k_pages, v_pages, lengths, block_tables, impl="triton")


# -- lowering: jax.export for the accelerators, with abstract devices (nothing runs, nothing allocated)

TPU_V5E = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def abstract_args(mesh, *, batch=4, heads=8, head_dim=256, n_pool=33, n_pages=8, dtype=jnp.bfloat16, int8=False):
    """ShapeDtypeStructs of one decode attention call, heads sharded over `mesh`'s tp axis."""
    def sds(shape, dt, spec):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    pool = (heads, n_pool, PAGE, head_dim)
    if int8:
        pages = QuantArray(sds(pool, jnp.int8, P(TP)), sds(pool[:3], jnp.float32, P(TP)))
    else:
        pages = sds(pool, dtype, P(TP))
    return (sds((batch, heads, head_dim), dtype, P(None, TP, None)), pages, pages,
            sds((batch,), jnp.int32, P()), sds((batch, n_pages), jnp.int32, P()))


def test_pallas_tpu_exports_for_a_v5e_2x2_under_shard_map():
    mesh = AbstractMesh((4,), (TP,), abstract_device=TPU_V5E)
    fn = jax.jit(lambda *a: paged_attention(*a, impl="pallas_tpu", mesh=mesh))
    exported = export.export(fn, platforms=("tpu",))(*abstract_args(mesh))
    text = exported.mlir_module()
    assert exported.nr_devices == 4 and "mhlo.num_partitions = 4" in text
    assert TPU_CUSTOM_CALL in text


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_pallas_gpu_exports_for_cuda(devices, int8):
    """Triton's custom call has no export compatibility guarantee, hence the disabled check; JAX 0.11
    needs an abstract GPU device in context to pick the compute capability on a GPU-less host."""
    mesh = AbstractMesh((devices,), (TP,), abstract_device=H100)
    fn = jax.jit(lambda *a: paged_attention(*a, impl="pallas_gpu", mesh=mesh))
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(fn, platforms=("cuda",),
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(
            *abstract_args(mesh, int8=int8))
    assert exported.nr_devices == devices
    assert TRITON_CUSTOM_CALL in exported.mlir_module()
