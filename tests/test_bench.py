"""The benchmark on a tiny config: the report has every figure, and they are consistent; the
programs it times (`fcdm_jax.programs`) take their batch from the model and the source.

Speed is never asserted (the machine is shared); the fields and their relations are.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fcdm_jax.perf import benchmark, input_bench, machine, measure
from fcdm_jax.perf.dwconv_study import dwconv_study
from fcdm_jax.programs import Programs

from helpers.training import TINY_CONFIG, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# tiny.py (8x8x4 latents, XLA's grouped conv) with two blocks a level of 16 channels: the
# figures below are checked on this model's levels and scanned blocks.
TINY_MODEL = {"model.hidden_size": 16, "model.depth": (2, 2, 2, 2, 2), "model.num_classes": 10}


def tiny_config():
  return load_config(**TINY_MODEL)


@pytest.fixture(scope="module")
def report():
  pytest.importorskip("torch")
  return benchmark.run(tiny_config(), batch=2, repeats=2, warmup=1, vs_torch=True,
                       num_devices=1, log=lambda s: None)


@pytest.mark.slow
def test_report_fields(report):
  assert report["batch"] == 2 and report["latent_shape"] == [8, 8, 4]
  assert report["dtype"] == "float32" and report["remat"] == "none"
  assert report["dwconv_impl_resolved"] == "xla"
  assert report["peak_tflops"] > 0 and report["peak_source"]
  macs = report["forward_gmacs_per_image"] * 1e9
  assert macs > 0
  for mode, factor in (("sample", 2), ("train", 6)):
    r = report["results"][mode]
    assert r["compile_s"] > 0 and r["lower_s"] <= r["compile_s"]
    st, ips = r["step_s"], r["img_per_s"]
    assert 0 < st["min"] <= st["median"] <= st["max"]
    assert ips["median"] == pytest.approx(2 / st["median"])
    assert r["repeats"] == 2
    assert r["model_flops_per_step"] == pytest.approx(factor * macs * 2)
    assert r["achieved_tflops"] == pytest.approx(r["model_flops_per_step"] / st["median"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / report["peak_tflops"])
    assert r["memory"]["peak_bytes"] > 0 and r["memory"]["source"]
    assert r["memory"]["xla_planned_bytes"] > 0
    t = r["torch"]
    assert 0 < t["step_s"]["min"] <= t["step_s"]["median"] <= t["step_s"]["max"]
    assert r["speedup_vs_torch"] == pytest.approx(t["step_s"]["median"] / st["median"])
    assert r["speedup_vs_torch_best"] == pytest.approx(t["step_s"]["min"] / st["min"])
    for side in (r, t):  # per-step load of other processes, and the quiet steps among them
      assert len(side["other_load"]) == 2 and all(0 <= o <= 1 for o in side["other_load"])
      assert side["quiet_steps"] == sum(o < measure.QUIET for o in side["other_load"])
  assert report["torch"]["checkpoint_blocks"] is False
  text = benchmark.format_report(report)
  assert "train" in text and "sample" in text and "JAX/PyTorch" in text


@pytest.mark.slow
def test_xla_flops_count_every_scanned_block(report):
  """XLA counts a scan body once; the bench counts the step lowered unrolled. The forward's
  XLA count covers the model's multiply-adds (plus elementwise work), which a body-once
  count of these 2-block stages (about half the blocks missing) would not."""
  sample = report["results"]["sample"]
  assert 0.95 <= sample["xla_flops_per_step"] / sample["model_flops_per_step"] < 1.6
  train = report["results"]["train"]
  assert train["xla_flops_per_step"] > 0.95 * train["model_flops_per_step"]


def test_peak_table_and_cpu_peak():
  assert machine.chip_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert machine.chip_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert machine.chip_peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == 19.5
  assert machine.chip_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert machine.chip_peak_tflops("TPU v5p", "float32") == 459.0  # TPUs: the bf16 MXU rate
  assert machine.chip_peak_tflops("TPU v6 lite", "bfloat16") == 918.0
  assert machine.chip_peak_tflops("Some future chip", "bfloat16") is None
  cpu = machine.cpu_peak(cores=2)
  if cpu["clock_ghz"]:
    per_cycle = 2 * cpu["fma_units"] * cpu["vector_bits"] // 32
    assert cpu["peak_tflops"] == pytest.approx(2 * cpu["clock_ghz"] * 1e9 * per_cycle / 1e12)


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown mode"):
    benchmark.run(tiny_config(), modes=("infer",), log=lambda s: None)
  with pytest.raises(ValueError, match="unknown dtype"):
    benchmark.run(tiny_config(), dtype="fp8", log=lambda s: None)


@pytest.mark.slow
def test_command_line_writes_json(tmp_path):
  """The CLI (absl flags, --config file with overrides, --json) on a compile-only run."""
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "fcdm_jax.bench", f"--config={TINY_CONFIG}:flow",
         "--config.model.mlp_ratio=2", "--batch=2", "--mode=sample", "--compile_only",
         "--remat=block", f"--json={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["compile_only"] is True and report["remat"] == "block"
  assert report["model"]["mlp_ratio"] == 2 and report["model"]["learn_sigma"] is False
  r = report["results"]["sample"]
  assert r["compile_s"] > 0 and "step_s" not in r and r["xla_flops_per_step"] > 0
  assert report["command"].startswith("python -m fcdm_jax.bench --config=")


def tiny_text_config():
  """The tiny model conditioned on text embeddings, on a pixel source without a posterior."""
  config = tiny_config()
  config.model.update(condition="text", text_dim=16, in_channels=3)
  config.data.source = "colour_digits"
  config.image_size = 8
  return config


def test_programs_take_the_batch_from_the_model_and_the_source():
  """Class labels and a latent posterior; text embeddings and pixels: the abstract batch,
  the host values filling it, and the train step and guided forward lowered on it."""
  programs = Programs(tiny_config(), 8)
  b = programs.abstract_batch
  assert set(b) == {"x", "y", "x_std"} and b["x"].shape == b["x_std"].shape == (8, 8, 8, 4)
  assert (b["y"].shape, b["y"].dtype) == ((8,), np.int32)
  batch, t = programs.random_batch()
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (a.shape, a.dtype) for k, a in b.items()} and t.shape == (8,)
  y = np.asarray(batch["y"])
  assert y.min() >= 0 and y.max() < 10 and len(set(y.tolist())) > 1   # in range, not all 0

  text = Programs(tiny_text_config(), 8, cfg_scale=4.0)
  b = text.abstract_batch
  assert set(b) == {"x", "y"} and b["x"].shape == (8, 8, 8, 3) and text.input_shape == (8, 8, 3)
  assert (b["y"].shape, b["y"].dtype) == ((8, 16), np.float32)
  batch, _ = text.random_batch()
  assert batch["y"].shape == (8, 16) and batch["y"].dtype == np.float32
  assert 0.5 < float(np.std(np.asarray(batch["y"]))) < 1.5
  assert text.lower_train() is not None
  guided = text.lower_sample().as_text()   # the batch [x; x] with [y; the empty caption's]
  assert "tensor<16x8x8x3xf32>" in guided and "tensor<16x16xf32>" in guided
  with pytest.raises(ValueError, match="divisible by the 8 data-parallel devices"):
    Programs(tiny_config(), 4)


@pytest.mark.slow
def test_text_config_benches_from_the_command_line(tmp_path):
  """configs/t2i_demo.py (text conditions, pixels): the training step compiled and timed."""
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "fcdm_jax.bench", "--config=configs/t2i_demo.py", "--mode=train",
         "--batch=2", "--repeats=1", "--warmup=0", f"--json={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["model"]["condition"] == "text" and report["latent_shape"] == [32, 32, 3]
  train = report["results"]["train"]
  assert train["step_s"]["median"] > 0 and train["xla_flops_per_step"] > 0


@pytest.mark.slow
def test_dwconv_study_fields():
  impls = ("xla", "shift_vjp")
  study = dwconv_study(tiny_config(), batch=2, repeats=1, impls=impls, log=lambda s: None)
  assert [row["shape"] for row in study["levels"]] == [[2, 8, 8, 16], [2, 4, 4, 32], [2, 2, 2, 64]]
  for row in study["levels"]:
    assert set(row) == {"shape", *impls}
    for impl in impls:
      for what in ("fwd", "bwd", "chain"):
        assert 0 < row[impl][what]["min_ms"] <= row[impl][what]["median_ms"]


def test_input_mode_times_every_source_kind(tmp_path):
  """Synthetic datasets of each kind at the config's shape, the config's own data, and
  grain's reader beside ours on the latent shards (the same records)."""
  pytest.importorskip("grain")
  from helpers.training import make_latent_dataset
  config = tiny_config()
  config.model.in_channels = 4
  config.model.num_classes = 4
  config.data.update(source="latents", path=make_latent_dataset(tmp_path / "own", count=40))
  kinds = ["latents", "torch_features", "torch_zarr", "embedded"]
  report = input_bench.run_input(config, batch=8, steps=3, warmup=1,
                                 sources=["config", *kinds], num_examples=64, log=lambda s: None)
  assert list(report["results"]) == ["config:latents", *kinds]
  for name, r in report["results"].items():
    assert r["examples_per_s"] > 0 and r["batch"] == 8 and r["steps"] == 3
    assert 0 < r["batch_s_min"] <= r["batch_s_median"] and r["cores_used"] >= 0
  for name in ("config:latents", "latents"):
    g = report["results"][name]["grain"]
    assert g["examples_per_s"] > 0 and g["threads"] >= 1
    ratio = g["examples_per_s"] / report["results"][name]["examples_per_s"]
    assert report["results"][name]["grain_speed_ratio"] == pytest.approx(ratio)
  assert "config:latents" in report["results"] and "own" in \
      report["results"]["config:latents"]["description"]
  with pytest.raises(ValueError, match="unknown input source"):
    input_bench.run_input(config, batch=8, sources=["parquet"], log=lambda s: None)


def test_grain_reads_the_records_our_source_reads(tmp_path):
  """The grain side of the comparison does the same work: each example's flip posterior."""
  pytest.importorskip("grain")
  from fcdm_jax.data import LatentDataset
  from helpers.training import make_latent_dataset
  ds = LatentDataset(make_latent_dataset(tmp_path / "d", count=16))
  batch = input_bench.grain_latent_batches(ds, 4, 2, 0.5)(0)
  assert batch["x"].shape == batch["x_std"].shape == (4, 8, 8, 4)
  np.testing.assert_allclose(batch["x_std"], 0.05, rtol=1e-6)   # std 0.1 x vae_scale 0.5
  rec = ds.read(np.arange(16))
  means = rec["latent"][:, :, 0] * 0.5                            # (16, flip, H, W, C)
  for x in batch["x"]:
    assert np.any(np.all(np.isclose(means, x), axis=(2, 3, 4)))
