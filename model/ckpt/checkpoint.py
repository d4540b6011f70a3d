"""Checkpoints: Hugging Face GPT-J directories, the native JAX-layout format, presets, and URIs.

Where a checkpoint can come from (`load`):
- a preset name (`tiny`, `small`, `gptj-6b`): random weights of those shapes from a fixed seed;
- a Hugging Face GPT-J directory: config.json plus model.safetensors, sharded safetensors with
  model.safetensors.index.json, or pytorch_model.bin (only when torch is installed, and always
  with `weights_only=True`: no pickle code runs);
- a native directory written by `python -m model.convert` (`gptj_native.json` + safetensors in the
  JAX layout), restored straight into the target sharding: each device's slice is read from a
  memory map, so no device's full copy of a weight is built on the host;
- any of the above behind an fsspec URI (`gs://bucket/dir`, through gcsfs), mirrored once into a
  local cache directory (`GPTJ_CACHE_DIR`, default ~/.cache/gptj-serve).

Conversion from the Hugging Face layout is target-driven: every native leaf names the source tensors
it is built from, so a missing key, a leftover key and a wrong shape are each caught and named.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np

from model.ckpt import safetensors_io
from model.nn.config import PRESETS, ConfigError, GPTJConfig
from model.nn.sharding import ParamSpec

NATIVE_MANIFEST = "gptj_native.json"
NATIVE_WEIGHTS = "weights.safetensors"
NATIVE_FORMAT = "gptj-serve-native/1"
PRESET_SEED = 0

# Buffers that old GPT-J checkpoints carry (the causal-mask constants); not weights.
HF_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the GPT-J shapes it declares."""


# ---------------------------------------------------------------------------------------------
# Leaf names: the native checkpoint's keys are the weights pytree's paths ("layers.3.qkv").


def leaf_names(tree: Any) -> dict[str, Any]:
    """Flatten a Weights-shaped pytree (of arrays or ParamSpecs) to {"layers.3.qkv": leaf}."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, ParamSpec))
    out = {}
    for path, leaf in flat:
        parts = []
        for p in path:
            parts.append(str(p.name if hasattr(p, "name") else p.idx if hasattr(p, "idx") else p.key))
        out[".".join(parts)] = leaf
    return out


def unflatten_like(specs: Any, named: dict[str, Any]) -> Any:
    import jax

    names = list(leaf_names(specs))
    _, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    return jax.tree.unflatten(treedef, [named[n] for n in names])


# ---------------------------------------------------------------------------------------------
# Hugging Face layout -> native layout.


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one native leaf is built: from these HF tensors, by this function."""

    sources: tuple[str, ...]
    build: Callable[..., np.ndarray]


def hf_recipes(cfg: GPTJConfig) -> dict[str, Recipe]:
    """For every native leaf, the HF tensors it comes from. torch Linear stores [out, in]."""
    n, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model

    def same(x):
        return x

    def transpose(x):
        return x.T

    def fused_qkv(q, k, v):  # each [N*H, D] -> [D, 3, N, H]
        return np.stack([q.T, k.T, v.T], axis=1).reshape(d, 3, n, h)

    def out_proj(w):  # [D, N*H] -> [N, H, D]
        return w.T.reshape(n, h, d)

    recipes = {"wte": Recipe(("transformer.wte.weight",), same)}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        recipes |= {
            f"layers.{i}.ln_scale": Recipe((p + "ln_1.weight",), same),
            f"layers.{i}.ln_bias": Recipe((p + "ln_1.bias",), same),
            f"layers.{i}.qkv": Recipe(
                (p + "attn.q_proj.weight", p + "attn.k_proj.weight", p + "attn.v_proj.weight"), fused_qkv
            ),
            f"layers.{i}.out": Recipe((p + "attn.out_proj.weight",), out_proj),
            f"layers.{i}.fc_in": Recipe((p + "mlp.fc_in.weight",), transpose),
            f"layers.{i}.fc_in_bias": Recipe((p + "mlp.fc_in.bias",), same),
            f"layers.{i}.fc_out": Recipe((p + "mlp.fc_out.weight",), transpose),
            f"layers.{i}.fc_out_bias": Recipe((p + "mlp.fc_out.bias",), same),
        }
    recipes |= {
        "ln_f_scale": Recipe(("transformer.ln_f.weight",), same),
        "ln_f_bias": Recipe(("transformer.ln_f.bias",), same),
        "lm_head": Recipe(("lm_head.weight",), transpose),
        "lm_head_bias": Recipe(("lm_head.bias",), same),
    }
    return recipes


def native_to_hf(cfg: GPTJConfig, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `hf_recipes`: native leaves -> a Hugging Face GPT-J state dict (so
    transformers can run exactly the weights a preset or native checkpoint holds)."""
    d = cfg.d_model
    out = {"transformer.wte.weight": named["wte"], "transformer.ln_f.weight": named["ln_f_scale"],
           "transformer.ln_f.bias": named["ln_f_bias"], "lm_head.weight": named["lm_head"].T,
           "lm_head.bias": named["lm_head_bias"]}
    for i in range(cfg.n_layers):
        p, n = f"transformer.h.{i}.", f"layers.{i}."
        qkv = named[n + "qkv"].reshape(d, 3, d)  # [D, 3, N*H]
        out |= {
            p + "ln_1.weight": named[n + "ln_scale"], p + "ln_1.bias": named[n + "ln_bias"],
            p + "attn.q_proj.weight": qkv[:, 0].T, p + "attn.k_proj.weight": qkv[:, 1].T,
            p + "attn.v_proj.weight": qkv[:, 2].T, p + "attn.out_proj.weight": named[n + "out"].reshape(d, d).T,
            p + "mlp.fc_in.weight": named[n + "fc_in"].T, p + "mlp.fc_in.bias": named[n + "fc_in_bias"],
            p + "mlp.fc_out.weight": named[n + "fc_out"].T, p + "mlp.fc_out.bias": named[n + "fc_out_bias"],
        }
    return out


def hf_source_shapes(cfg: GPTJConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF GPT-J tensor must have for this config."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"transformer.wte.weight": (v, d), "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
              "lm_head.weight": (v, d), "lm_head.bias": (v,)}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "mlp.fc_in.weight": (f, d),
                   p + "mlp.fc_in.bias": (f,), p + "mlp.fc_out.weight": (d, f), p + "mlp.fc_out.bias": (d,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"attn.{proj}.weight"] = (d, d)
    return shapes


class TensorStore:
    """Name -> lazily read numpy tensor, over one or more files of a checkpoint directory."""

    def __init__(self, readers: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple[int, ...]]):
        self._readers = readers
        self.shapes = shapes

    def keys(self) -> set[str]:
        return set(self._readers)

    def read(self, name: str) -> np.ndarray:
        return self._readers[name]()


def open_hf_tensors(path: str) -> TensorStore:
    """The tensors of an HF directory: safetensors (single or indexed) first, then torch .bin."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index) or os.path.exists(single):
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        readers, shapes = {}, {}
        for name in files:
            file_path = os.path.join(path, name)
            if not os.path.exists(file_path):
                raise CheckpointError(f"{path}: shard {name} named in model.safetensors.index.json is missing")
            st = safetensors_io.SafetensorsFile(file_path)
            for key in st.keys():
                readers[key] = (lambda st=st, key=key: st.get(key))
                shapes[key] = st.shape(key)
        return TensorStore(readers, shapes)
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        return _open_torch_bins(path, bins)
    raise CheckpointError(
        f"{path}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _open_torch_bins(path: str, bins: list[str]) -> TensorStore:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} holds only pytorch_model.bin, which needs torch to read; install torch or convert it to safetensors"
        ) from None
    state: dict[str, Any] = {}
    for b in bins:
        # weights_only=True: tensors and plain containers only, never arbitrary pickled code.
        state |= torch.load(b, map_location="cpu", weights_only=True)

    def to_numpy(t):
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    readers = {k: (lambda t=t: to_numpy(t)) for k, t in state.items()}
    return TensorStore(readers, {k: tuple(t.shape) for k, t in state.items()})


def read_hf_config(path: str) -> GPTJConfig:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    with open(config_path) as f:
        return GPTJConfig.from_hf_dict(json.load(f))


def check_hf_tensors(cfg: GPTJConfig, store: TensorStore, where: str) -> None:
    """Every expected tensor present with its shape; nothing left over but the known buffers."""
    expected = hf_source_shapes(cfg)
    present = {k for k in store.keys() if not k.endswith(HF_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - present)
    leftover = sorted(present - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if leftover:
        raise CheckpointError(f"{where}: {len(leftover)} unexpected tensor(s) not used by GPT-J, e.g. {leftover[:3]}")
    for name, shape in expected.items():
        if tuple(store.shapes[name]) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(store.shapes[name])}, expected {shape}")


def iter_hf_as_native(cfg: GPTJConfig, store: TensorStore) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (native name, float32 array in the native layout), one unquantized leaf at a time."""
    from model.nn.transformer import Weights

    specs = leaf_names(Weights.param_specs(cfg, np.float32))
    recipes = hf_recipes(cfg)
    if set(recipes) != set(specs):  # the two declarations of the model must agree
        raise CheckpointError(f"native leaves and HF recipes disagree: {sorted(set(recipes) ^ set(specs))[:5]}")
    for name, spec in specs.items():
        recipe = recipes[name]
        array = recipe.build(*(np.asarray(store.read(s), dtype=np.float32) for s in recipe.sources))
        if array.shape != spec.shape:
            raise CheckpointError(f"leaf {name}: built shape {array.shape}, expected {spec.shape}")
        yield name, array


def quantization_targets(cfg: GPTJConfig, quantize_lm_head: bool) -> dict[str, int]:
    """Native leaf name -> contracted leading axes, for every leaf int8 quantization covers."""
    from model.nn.transformer import QUANTIZABLE

    targets = {f"layers.{i}.{name}": n for i in range(cfg.n_layers) for name, n in QUANTIZABLE.items()}
    return targets | ({"lm_head": 1} if quantize_lm_head else {})


def quantize_leaves(leaves: Iterator[tuple[str, np.ndarray]], targets: dict[str, int]) -> Iterator[tuple[str, np.ndarray]]:
    """Replace each target leaf by its int8 values and float32 scales (`name.values`, `name.scale`)."""
    from model.nn.quant import quantize

    for name, array in leaves:
        if name in targets:
            q = quantize(array, targets[name], xp=np)
            yield f"{name}.values", q.values
            yield f"{name}.scale", q.scale
        else:
            yield name, array


# ---------------------------------------------------------------------------------------------
# Locations.


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve(path: str, progress: bool = True) -> str:
    """A local directory for `path`: itself, or a cached mirror of a remote fsspec URI."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not is_uri(path):
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist (and is not a preset: {sorted(PRESETS)})")
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path!r} is a file; expected a checkpoint directory")
        return path
    return _mirror(path, progress)


def _mirror(uri: str, progress: bool) -> str:
    import fsspec

    cache_root = os.environ.get("GPTJ_CACHE_DIR", os.path.expanduser("~/.cache/gptj-serve"))
    local = os.path.join(cache_root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])
    done_marker = os.path.join(local, ".complete")
    if os.path.exists(done_marker):
        return local
    try:
        fs, root = fsspec.core.url_to_fs(uri)
        files = [f for f in fs.find(root) if not f.endswith("/")]
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"cannot open {uri}: {e}") from None
    if not files:
        raise CheckpointError(f"checkpoint {uri!r} does not exist or is empty")
    os.makedirs(local, exist_ok=True)
    total = sum(fs.size(f) for f in files)
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {uri}", disable=not progress, file=sys.stderr) as bar:
        for f in files:
            rel = os.path.relpath(f, root.rstrip("/"))
            dest = os.path.join(local, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with fs.open(f, "rb") as src, open(dest + ".part", "wb") as out:
                while chunk := src.read(64 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            os.replace(dest + ".part", dest)
    open(done_marker, "w").close()
    return local


def kind(path: str) -> str:
    """'native' or 'hf' for a local checkpoint directory."""
    if os.path.exists(os.path.join(path, NATIVE_MANIFEST)):
        return "native"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise CheckpointError(f"{path}: neither a native checkpoint ({NATIVE_MANIFEST}) nor a Hugging Face one (config.json)")


# ---------------------------------------------------------------------------------------------
# Native format.


def read_native_manifest(path: str) -> dict:
    with open(os.path.join(path, NATIVE_MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {NATIVE_FORMAT!r}")
    return manifest


def write_native(path: str, cfg: GPTJConfig, leaves: Iterator[tuple[str, np.ndarray]], specs: dict[str, ParamSpec],
                 quantization: str | None = None, quantize_lm_head: bool = False) -> None:
    os.makedirs(path, exist_ok=True)
    safetensors_io.write(
        os.path.join(path, NATIVE_WEIGHTS),
        leaves,
        {name: (s.shape, np.dtype(s.dtype)) for name, s in specs.items()},
        metadata={"format": NATIVE_FORMAT},
    )
    manifest = {"format": NATIVE_FORMAT, "config": dataclasses.asdict(cfg), "quantization": quantization,
                "quantize_lm_head": quantize_lm_head}
    with open(os.path.join(path, NATIVE_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Loading into devices.


@dataclasses.dataclass
class Loaded:
    cfg: GPTJConfig
    weights: Any  # transformer.Weights
    source: str  # "preset", "hf" or "native"
    quantization: str | None = None  # None or "int8"


def load(checkpoint: str, mesh=None, dtype: str | None = None, quantize: str | None = None,
         quantize_lm_head: bool = False, progress: bool = True) -> Loaded:
    """Load `checkpoint` (preset name, HF dir, native dir, or URI) onto `mesh` (default: 1 device).

    dtype: "float32" / "bfloat16" for the float matrices (default: float32 for presets and HF
    checkpoints, the stored dtype for native ones).
    quantize: None (as stored: a native int8 checkpoint stays int8) or "int8": int8 weight-only
    quantization of qkv / out / fc_in / fc_out (and lm_head with `quantize_lm_head`) at load."""
    import jax
    import jax.numpy as jnp

    from model.nn import sharding as shard_lib
    from model.nn.transformer import Weights, init_weights, quantize_weights

    if quantize not in (None, "int8"):
        raise CheckpointError(f"quantize must be None or 'int8', got {quantize!r}")
    mesh = mesh if mesh is not None else shard_lib.make_mesh(1)

    def finish(cfg, matrix_dtype, quantization, lm_head, host_leaves, source):
        """Place host leaves (already quantized as requested) onto the mesh."""
        specs = Weights.param_specs(cfg, matrix_dtype, quantization is not None, lm_head)
        named_specs = leaf_names(specs)
        arrays = {}
        for name, array in _progress(host_leaves, "load", progress, len(named_specs)):
            spec = named_specs[name]
            arrays[name] = jax.device_put(np.asarray(array).astype(spec.dtype), shard_lib.named_sharding(mesh, spec))
        return Loaded(cfg, unflatten_like(specs, arrays), source, quantization)

    if checkpoint in PRESETS:
        cfg = PRESETS[checkpoint]
        matrix_dtype = jnp.dtype(dtype or "float32")
        specs = Weights.param_specs(cfg, matrix_dtype)
        weights = init_weights(cfg, jax.random.key(PRESET_SEED), matrix_dtype, shard_lib.shardings(mesh, specs))
        if quantize:
            q_specs = Weights.param_specs(cfg, matrix_dtype, True, quantize_lm_head)
            weights = jax.jit(lambda w: quantize_weights(w, quantize_lm_head),
                              out_shardings=shard_lib.shardings(mesh, q_specs), donate_argnums=0)(weights)
        return Loaded(cfg, weights, "preset", quantize)

    local = resolve(checkpoint, progress)
    if kind(local) == "hf":
        cfg = read_hf_config(local)
        store = open_hf_tensors(local)
        check_hf_tensors(cfg, store, local)
        targets = quantization_targets(cfg, quantize_lm_head) if quantize else {}
        leaves = quantize_leaves(iter_hf_as_native(cfg, store), targets)
        return finish(cfg, jnp.dtype(dtype or "float32"), quantize, quantize_lm_head, leaves, "hf")

    manifest = read_native_manifest(local)
    try:
        cfg = GPTJConfig(**manifest["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{local}: bad config in {NATIVE_MANIFEST}: {e}") from None
    st = safetensors_io.SafetensorsFile(os.path.join(local, NATIVE_WEIGHTS))
    stored_q, stored_lm = manifest.get("quantization"), bool(manifest.get("quantize_lm_head"))
    matrix_dtype = jnp.dtype(dtype) if dtype else st.dtype("wte") if "wte" in st.keys() else jnp.float32
    if quantize and stored_q is None:  # quantize a float native checkpoint now, from whole leaves
        base = leaf_names(Weights.param_specs(cfg, matrix_dtype))
        _check_native(local, st, base)
        leaves = ((name, np.asarray(st.get(name), np.float32)) for name in base)
        targets = quantization_targets(cfg, quantize_lm_head)
        return finish(cfg, matrix_dtype, quantize, quantize_lm_head, quantize_leaves(leaves, targets), "native")

    # As stored: each device reads only its own slice of each leaf from the memory map.
    specs = Weights.param_specs(cfg, matrix_dtype, stored_q is not None, stored_lm)
    named_specs = leaf_names(specs)
    _check_native(local, st, named_specs)
    arrays = {}
    for name, spec in _progress(named_specs.items(), "restore", progress):
        source = st.get(name)
        arrays[name] = jax.make_array_from_callback(
            spec.shape, shard_lib.named_sharding(mesh, spec),
            lambda idx, src=source, dt=spec.dtype: np.asarray(src[idx]).astype(dt),
        )
    return Loaded(cfg, unflatten_like(specs, arrays), "native", stored_q)


def _check_native(path: str, st: safetensors_io.SafetensorsFile, named_specs: dict[str, ParamSpec]) -> None:
    keys = set(st.keys())
    missing = sorted(set(named_specs) - keys)
    leftover = sorted(keys - set(named_specs))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} leaf(s), e.g. {missing[:3]}")
    if leftover:
        raise CheckpointError(f"{path}: {len(leftover)} unexpected leaf(s), e.g. {leftover[:3]}")
    for name, spec in named_specs.items():
        if st.shape(name) != spec.shape:
            raise CheckpointError(f"{path}: leaf {name} has shape {st.shape(name)}, expected {spec.shape}")


def _progress(items, desc: str, enabled: bool, total: int | None = None):
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="tensor", disable=not enabled, file=sys.stderr, mininterval=1.0)
