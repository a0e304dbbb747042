import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcam_jax.models.layers import linear


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
def test_linear_equals_matmul_and_its_gradient(shape):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (5, 7))
    y = linear(x, w)
    assert y.shape == shape[:-1] + (7,)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-5)
    f = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(f(linear), f(lambda x, w: x @ w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_the_input_dtype():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    assert linear(x, jnp.ones((4, 6), jnp.float32)).dtype == jnp.bfloat16
