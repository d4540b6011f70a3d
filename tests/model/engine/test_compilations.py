"""The compile counter: it counts every XLA compilation in the process, and importing an engine
registers nothing (the listener starts with the first count)."""

import subprocess
import sys

import jax
import jax.numpy as jnp

from model.engine.compilations import compilation_count


def test_a_new_shape_is_one_compilation_and_a_cached_one_none():
    f = jax.jit(lambda x: x * 3 + 1)
    x, y = jax.block_until_ready((jnp.ones((7, 13)), jnp.ones((5, 11))))  # (building them compiles too)
    before = compilation_count()
    f(x)
    assert compilation_count() - before == 1
    f(x)
    assert compilation_count() - before == 1
    f(y)
    assert compilation_count() - before == 2


def test_importing_an_engine_registers_no_listener():
    code = ("import model.engine.paged, model.engine.mock, model.engine.compilations as c; "
            "assert not c._listening; c.compilation_count(); assert c._listening")
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
