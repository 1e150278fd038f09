"""The PyTorch FCDM reference module, and checkpoints exported for the published code.

(a) the module itself reproduces the published fixture, so it can judge exports;
(b) a `.pt` / `.safetensors` written from random Flax params loads the way the published
    sampling script loads it and gives the Flax outputs;
(c) its state_dict is the published one for every variant.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

from fcdm_jax import convert, torch_fcdm  # noqa: E402
from fcdm_jax.models import FCDM, get_variant  # noqa: E402

TOL = 1e-4
TINY = dict(in_channels=4, hidden_size=32, depth=(1, 2, 2, 1, 1), mlp_ratio=3.0,
            class_dropout_prob=0.1, num_classes=10, learn_sigma=True)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def fixture(reference_dir):
  return dict(np.load(reference_dir / "fcdm_tiny.npz"))


def test_reference_module_reproduces_published_fixture(fixture):
  model = torch_fcdm.FCDM(**TINY).eval()
  sd = {k[len("param/"):]: torch.from_numpy(v) for k, v in fixture.items()
        if k.startswith("param/")}
  model.load_state_dict(sd, strict=True)
  assert list(model.state_dict()) == list(sd), "state_dict order differs from the published one"
  t = lambda k: torch.from_numpy(fixture[k])
  with torch.no_grad():
    assert max_err(model(t("x"), t("t_ddpm"), t("y")), fixture["out_ddpm"]) < TOL
    assert max_err(model(t("x"), t("t_flow"), t("y")), fixture["out_flow"]) < TOL
    out = model(t("x"), t("t_ddpm"), t("y"), force_drop_ids=t("force_drop_ids"))
    assert max_err(out, fixture["out_forced_drop"]) < TOL
    out = model.forward_with_cfg(t("cfg_x"), t("cfg_t"), t("cfg_y"), float(fixture["cfg_scale"]))
    assert max_err(out, fixture["out_cfg"]) < TOL


def test_checkpointed_blocks_give_same_gradients():
  """Per-block recomputation is a memory choice only: same loss and gradients."""
  torch.manual_seed(0)
  plain = torch_fcdm.FCDM(**TINY)
  remat = torch_fcdm.FCDM(**TINY, checkpoint_blocks=True)
  for p in plain.parameters():
    torch.nn.init.normal_(p, std=0.1)
  remat.load_state_dict(plain.state_dict())
  x = torch.randn(2, 4, 8, 8)
  t = torch.tensor([3.0, 700.0])
  y = torch.tensor([1, 2])
  drop = torch.zeros(2, dtype=torch.long)
  grads = []
  for m in (plain, remat):
    m.zero_grad()
    m(x, t, y, force_drop_ids=drop).square().mean().backward()
    grads.append([p.grad.clone() for p in m.parameters()])
  for a, b in zip(*grads):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def random_flax_params(model, seed=0):
  """A random non-zero value in every parameter (zero-initialised layers too); shapes from
  an abstract init, so nothing is compiled for it."""
  x = jnp.zeros((1, 8, 8, model.in_channels))
  z = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, z, z)["params"]))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def flax_case():
  """Random Flax params (model and EMA), inputs, and the Flax outputs (NHWC), computed once."""
  model = FCDM(**TINY)
  params = random_flax_params(model)
  ema = jax.tree_util.tree_map(lambda p: p * 0.9, params)
  rng = np.random.default_rng(0)
  inputs = dict(x=rng.standard_normal((4, 16, 16, 4)).astype(np.float32),
                t=np.array([0.0, 10.0, 500.0, 999.0], np.float32),
                y=np.array([0, 3, 9, 10], np.int32),
                drop=np.array([1, 0, 1, 0], np.int32),
                y_cfg=np.array([2, 7, 10, 10], np.int32))
  plain = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  dropped = jax.jit(lambda p, x, t, y, d: model.apply({"params": p}, x, t, y, force_drop_ids=d))
  guided = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, 3.0,
                                                 method=FCDM.forward_with_cfg))
  i = inputs
  outputs = dict(ema=np.asarray(plain(ema, i["x"], i["t"], i["y"])),
                 model=np.asarray(plain(params, i["x"], i["t"], i["y"])),
                 drop=np.asarray(dropped(ema, i["x"], i["t"], i["y"], i["drop"])),
                 cfg=np.asarray(guided(ema, i["x"], i["t"], i["y_cfg"])))
  return params, ema, inputs, outputs


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_exported_checkpoint_loads_in_published_module(tmp_path, flax_case, suffix):
  params, ema, i, want = flax_case
  path = str(tmp_path / f"ckpt{suffix}")
  convert.save_torch_checkpoint(path, params, ema_params=ema)

  if suffix == ".pt":
    ckpt = torch.load(path)  # plain, as the published sampling script does (weights_only=True)
    assert set(ckpt) == {"model", "ema"}
    sd = ckpt["ema"]
  else:
    from safetensors.torch import load_file
    sd = load_file(path)
  tmodel = torch_fcdm.FCDM(**TINY).eval()
  tmodel.load_state_dict(sd, strict=True)

  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  from_nchw = lambda a: a.numpy().transpose(0, 2, 3, 1)
  x, t = to_nchw(i["x"]), torch.from_numpy(i["t"])
  y = torch.from_numpy(i["y"].astype(np.int64))
  with torch.no_grad():
    assert max_err(from_nchw(tmodel(x, t, y)), want["ema"]) < TOL
    got = tmodel(x, t, y, force_drop_ids=torch.from_numpy(i["drop"]))
    assert max_err(from_nchw(got), want["drop"]) < TOL
    got = tmodel.forward_with_cfg(x, t, torch.from_numpy(i["y_cfg"].astype(np.int64)), 3.0)
    assert max_err(from_nchw(got), want["cfg"]) < TOL
    if suffix == ".pt":  # the non-EMA weights travel too (the published layout keeps both)
      tmodel.load_state_dict(ckpt["model"], strict=True)
      assert max_err(from_nchw(tmodel(x, t, y)), want["model"]) < TOL


@pytest.mark.parametrize("variant", ["S", "B", "L", "XL"])
def test_state_dict_matches_published_manifest(reference_dir, variant):
  manifest = json.loads((reference_dir / "fcdm_state_dict_manifest.json").read_text())
  want = manifest[f"FCDM-{variant}"]
  with torch.device("meta"):  # shapes only: no memory for the weights
    model = torch_fcdm.FCDM(**get_variant(variant))
  sd = model.state_dict()
  assert [[k, list(v.shape)] for k, v in sd.items()] == want["state_dict"]
  assert sum(p.numel() for p in model.parameters()) == want["num_params"]
  assert sum(b.numel() for b in model.buffers()) == 0
