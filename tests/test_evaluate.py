"""`python -m fcdm_jax.evaluate` on tiny random batches with a random-weight Inception file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fcdm_jax import metrics
from fcdm_jax.evaluation import adm
from fcdm_jax.models import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A random-weight FID Inception `.pth` (pytorch-fid's key layout) and ADM-format batches."""
  torch = pytest.importorskip("torch")
  d = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  state_dict = {}
  for key, (_, shape) in inception.torch_layout().items():
    if key.endswith("running_var"):
      a = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(("running_mean", ".bias")):
      a = rng.uniform(-0.2, 0.2, shape)
    elif key.endswith("bn.weight"):
      a = rng.uniform(0.5, 1.5, shape)
    else:
      fan_in = int(np.prod(shape[1:]))
      a = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / fan_in)
    state_dict[key] = torch.from_numpy(a.astype(np.float32))
  torch.save(state_dict, d / "inception.pth")
  samples = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
  ref = rng.integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)
  mu = rng.normal(size=2048)
  sigma = np.cov(rng.normal(size=(64, 2048)), rowvar=False)
  np.savez_compressed(d / "samples.npz", arr_0=samples, arr_1=np.arange(6))  # read streamed
  np.savez(d / "ref.npz", arr_0=ref, mu=mu, sigma=sigma)
  return dict(dir=d, inception=str(d / "inception.pth"), samples=str(d / "samples.npz"),
              ref=str(d / "ref.npz"), sample_images=samples, ref_images=ref, mu=mu,
              sigma=sigma)


@pytest.mark.slow
def test_evaluate_wires_features_into_adm_metrics(files, monkeypatch):
  # A 2048-d sqrtm takes about a minute on two cores; FID's math is checked against ADM in
  # test_metrics, so here a recording stand-in checks which statistics reach it.
  calls = []

  def record(mu1, sigma1, mu2, sigma2):
    calls.append((mu1, sigma1, mu2, sigma2))
    return float(len(calls))

  monkeypatch.setattr(metrics, "frechet_distance", record)
  results = adm.evaluate(files["samples"], files["ref"], files["inception"], batch_size=4,
                              split_size=4)

  model, variables = inception.load_inception(files["inception"])
  direct = jax.jit(model.apply)
  s = direct(variables, jnp.asarray(files["sample_images"]))
  r = direct(variables, jnp.asarray(files["ref_images"]))
  probs = np.asarray(jax.nn.softmax(s["logits_unbiased"], axis=-1))

  assert results["num_samples"] == 6 and results["num_reference"] == 7
  np.testing.assert_allclose(results["inception_score"], metrics.inception_score(probs, 4),
                             rtol=1e-5)
  assert (results["fid"], results["sfid"]) == (1.0, 2.0)
  (fmu, fsigma, fmu_ref, fsigma_ref), (smu, ssigma, smu_ref, ssigma_ref) = calls
  mu, sigma = metrics.fid_statistics(np.asarray(s["pool"]))
  np.testing.assert_allclose(fmu, mu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(fsigma, sigma, rtol=1e-3, atol=1e-6)
  # The reference batch's own mu/sigma are used as given ...
  assert fmu_ref is not None and np.array_equal(fmu_ref, files["mu"])
  assert np.array_equal(fsigma_ref, files["sigma"])
  # ... and without mu_s/sigma_s the spatial statistics come from its images.
  assert smu.shape == (2023,) and ssigma.shape == (2023, 2023)
  mu_s, _ = metrics.fid_statistics(np.asarray(r["spatial"]))
  np.testing.assert_allclose(smu_ref, mu_s, rtol=1e-4, atol=1e-5)
  precision, recall = metrics.precision_recall(np.asarray(r["pool"]), np.asarray(s["pool"]))
  assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
  assert (results["precision"], results["recall"]) == (precision, recall)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fcdm_jax.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_writes_metrics_json(files):
  out = files["dir"] / "metrics.json"
  proc = _cli(f"--samples={files['samples']}", f"--ref={files['ref']}",
              f"--inception={files['inception']}", "--batch_size=4", "--metrics=is,pr",
              "--split_size=3", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert set(results) == {"num_samples", "num_reference", "inception_score", "precision",
                          "recall"}
  assert results["inception_score"] > 0.99   # >= 1 up to rounding
  assert f"Inception Score: {results['inception_score']}" in proc.stdout
  assert f"Recall: {results['recall']}" in proc.stdout


@pytest.mark.slow
def test_cli_help_and_error_exit(files):
  proc = _cli("--help")   # absl prints the usage and exits with status 1
  assert "ADM-compatible evaluation" in proc.stdout
  for flag in ("--samples", "--ref", "--inception", "--batch_size", "--out", "--metrics"):
    assert flag in proc.stdout
  proc = _cli(f"--samples={files['ref']}", "--ref=/nonexistent.npz",
              f"--inception={files['inception']}")
  assert proc.returncode != 0
  assert "error: reference batch not found: /nonexistent.npz" in proc.stderr


def _batch(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_bad_inputs(files, tmp_path):
  run = lambda samples, inception_path=files["inception"], ref=files["ref"]: adm.evaluate(
      samples, ref, inception_path, batch_size=8)
  good = files["samples"]
  with pytest.raises(FileNotFoundError, match="Inception weights not found"):
    run(good, inception_path=str(tmp_path / "pt_inception.pth"))
  other = tmp_path / "other.pth"
  import torch
  torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, other)
  with pytest.raises(ValueError, match="does not hold pytorch-fid's FID InceptionV3.*"
                                       "unexpected keys: conv.weight"):
    run(good, inception_path=str(other))
  with pytest.raises(ValueError, match=r"has no 'arr_0' array \(it holds \['images'\]\)"):
    run(_batch(tmp_path / "a.npz", images=files["sample_images"]))
  with pytest.raises(ValueError, match="dtype float32; images must be uint8"):
    run(_batch(tmp_path / "b.npz", arr_0=files["sample_images"].astype(np.float32)))
  with pytest.raises(ValueError, match=r"shape \(6, 16, 16, 1\); images must be \(N, H, W, 3\)"):
    run(_batch(tmp_path / "c.npz", arr_0=files["sample_images"][..., :1]))
  with pytest.raises(ValueError, match=r"shape \(6, 3, 16, 16\)"):
    run(_batch(tmp_path / "d.npz", arr_0=files["sample_images"].transpose(0, 3, 1, 2)))
  with pytest.raises(ValueError, match=r"sample images are \(32, 32\), reference images "
                                       r"\(16, 16\)"):
    run(_batch(tmp_path / "e.npz", arr_0=np.zeros((6, 32, 32, 3), np.uint8)))
  with pytest.raises(ValueError, match="not an .npz"):
    (tmp_path / "f.npz").write_bytes(b"not a zip")
    run(str(tmp_path / "f.npz"))
  with pytest.raises(ValueError, match="precision/recall needs"):
    run(good, ref=_batch(tmp_path / "g.npz", mu=files["mu"], sigma=files["sigma"]))
