"""The persistent compilation cache: on by default under the workdir, reused by a restart,
off with one flag."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from fcdm_jax import compilation_cache

from helpers.training import TINY_CONFIG, make_latent_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(workdir, dataset, *extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "fcdm_jax.main", f"--config={TINY_CONFIG}",
         f"--workdir={workdir}", f"--config.data.path={dataset}", *extra]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = re.search(r"first step \(with compilation\) took ([\d.]+) s; compilation cache: "
                    r"(\d+) hits, ([\d.]+) s of compiling saved", proc.stderr)
  assert found, proc.stderr[-3000:]
  return float(found.group(1)), int(found.group(2)), float(found.group(3))


@pytest.mark.slow
def test_restart_reuses_the_cache_in_the_workdir(tmp_path):
  dataset = make_latent_dataset(tmp_path / "latents")
  workdir = tmp_path / "run"
  first, hits, _ = run_main(workdir, dataset, "--config.num_train_steps=2")
  assert hits == 0 and any((workdir / compilation_cache.DEFAULT_SUBDIR).iterdir())
  again, hits, saved = run_main(workdir, dataset, "--config.num_train_steps=4")
  print(f"first step: {first:.1f} s cold, {again:.1f} s from the cache ({hits} hits, "
        f"{saved:.1f} s saved)")
  assert hits >= 1 and saved > 0 and again < first


def test_empty_setting_turns_the_cache_off(tmp_path, monkeypatch):
  """`--config.compilation_cache_dir=` (what train_and_evaluate passes to `enable`): no
  cache folder, and the cache disabled even when the environment names one."""
  jax = compilation_cache.jax
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "user"))
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  try:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache.enable("", str(tmp_path / "run")) is None
    assert jax.config.jax_enable_compilation_cache is False
    assert not (tmp_path / "run").exists() and not (tmp_path / "user").exists()
    assert compilation_cache.enable("auto", str(tmp_path / "run")) == str(tmp_path / "user")
    assert jax.config.jax_enable_compilation_cache is True
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_enable_compilation_cache", before[1])


def test_settings_resolve(tmp_path, monkeypatch):
  jax = compilation_cache.jax
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert compilation_cache.resolve("auto", "gs://b/run") == "gs://b/run/xla_cache"
    assert compilation_cache.resolve("auto", str(tmp_path)) == str(tmp_path / "xla_cache")
    assert compilation_cache.resolve("", str(tmp_path)) is None
    assert compilation_cache.resolve("/cache", str(tmp_path)) == "/cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/user/cache")
    assert compilation_cache.resolve("auto", str(tmp_path)) == "/user/cache"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
