"""The depthwise 7x7 conv formulations (`dwconv_impl`): same values and same gradients.

'shift_vjp' has a hand-written backward pass and computes in bands of rows; the whole
model with it must still match the published fixture.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcdm_jax import convert
from fcdm_jax.models import fcdm, layers

IMPLS = ("xla", "shift", "shift_vjp")


@pytest.mark.parametrize("shape", [(2, 12, 20, 16), (3, 7, 5, 8), (1, 8, 8, 4)])
def test_formulations_agree_with_gradients(shape):
  """Odd sizes too: 7 rows cannot be split in two bands (the unbanded path)."""
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (7, 7, 1, shape[-1]))
  g = jax.random.normal(kg, shape)
  results = {}
  for impl in IMPLS:
    fn = layers.DWCONV_FNS[impl]
    results[impl] = jax.jit(lambda x, k, g, fn=fn: (lambda o, vjp: (o,) + vjp(g))(
        *jax.vjp(fn, x, k)))(x, kernel, g)
  ref = results["xla"]
  for impl in IMPLS[1:]:
    for name, a, b in zip(("out", "dx", "dkernel"), results[impl], ref):
      scale = float(jnp.max(jnp.abs(b)))
      np.testing.assert_allclose(a, b, atol=2e-6 * scale, rtol=0, err_msg=f"{impl} {name}")


def test_kernel_grad_matches_its_definition():
  x = jax.random.normal(jax.random.key(1), (2, 6, 9, 3))
  g = jax.random.normal(jax.random.key(2), (2, 6, 9, 3))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
  want = np.zeros((7, 7, 1, 3))
  for i in range(7):
    for j in range(7):
      want[i, j, 0] = (xp[:, i:i + 6, j:j + 9] * np.asarray(g, np.float64)).sum((0, 1, 2))
  np.testing.assert_allclose(layers.depthwise_kernel_grad(x, g, 7, 7), want, atol=1e-4)


@pytest.mark.slow
def test_low_precision_accumulates_in_float32():
  """bf16 in and out, float32 accumulation: closer to the float32 result than bf16 sums."""
  x = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
  kernel = jax.random.normal(jax.random.key(4), (7, 7, 1, 4))
  exact = layers.depthwise_conv_xla(x, kernel)
  for impl in ("shift", "shift_vjp"):
    fn = layers.DWCONV_FNS[impl]
    out, vjp = jax.vjp(fn, x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    dx, dk = vjp(jnp.ones_like(out))
    assert out.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
    assert err < 0.05 * float(jnp.max(jnp.abs(exact))), impl


def test_auto_is_a_formulation():
  assert layers.resolve_dwconv_impl("auto") in IMPLS
  if jax.default_backend() == "cpu":
    assert layers.resolve_dwconv_impl("auto") == "shift_vjp"


def test_model_with_shift_vjp_matches_published_fixture(reference_dir):
  ref = np.load(reference_dir / "fcdm_tiny.npz")
  sd = {k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")}
  model = convert.infer_model(sd).clone(dwconv_impl="shift_vjp")
  params = convert.params_from_torch(sd)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  out = fwd(params, nhwc(ref["x"]), jnp.asarray(ref["t_ddpm"]), jnp.asarray(ref["y"]))
  assert float(jnp.max(jnp.abs(out - nhwc(ref["out_ddpm"])))) < 1e-4


@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "block"])
def test_scanned_blocks_gradients_match_grouped_conv(remat):
  """The hand-written backward inside nn.scan and (with 'block') jax.checkpoint."""
  dim = 16
  x = jax.random.normal(jax.random.key(5), (2, 8, 6, dim))
  c = jax.random.normal(jax.random.key(6), (2, dim))

  def grads(impl):
    stack = fcdm.block_stack(2, remat, False, "blocks", dim=dim, mlp_ratio=2.0, dwconv_impl=impl)
    params = nn.unbox(stack.init(jax.random.key(7), x, c)["params"])
    # Non-zero everywhere (adaLN and GRN start at zero), the same for both formulations.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(8), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in
                                       zip(keys, leaves)])
    loss = lambda p, x: jnp.sum(jnp.square(stack.apply({"params": p}, x, c)[0]))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  got, want = grads("shift_vjp"), grads("xla")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5 + 1e-5 * float(jnp.max(jnp.abs(b))), rtol=0)
