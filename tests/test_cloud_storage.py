"""The pod path on a real remote store: a GCS emulator on 127.0.0.1 (tests/helpers/gcs_emulator.py).

Latents are extracted into the bucket, the tiny config trains from them with its workdir in
the bucket, is SIGKILLed mid-run and resumed to a final state bit-identical to a run that
was never interrupted; previews and TensorBoard events land in the bucket; sampling reads
the run from the bucket and writes its batch there; evaluation reads that batch.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fcdm_jax import fileio
from helpers.image_files import write_image_folder
from helpers.model_files import write_inception, write_vae_dir
from helpers.runs import REPO, restore_final
from helpers.training import TINY_CONFIG


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")


def _run(*args, wait=True, step_delay=None):
  entry = [str(REPO / "tests/helpers/slow_main.py")] if step_delay else ["-m", args[0]]
  rest = args[1:] if not step_delay else args
  env = dict(_env(), STEP_DELAY=str(step_delay or 0))
  proc = subprocess.Popen([sys.executable, *entry, *rest], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]
  return out


def _train_args(workdir, latents):
  return (f"--config={TINY_CONFIG}", f"--workdir={workdir}", f"--config.data.path={latents}",
          "--config.num_train_steps=8", "--config.checkpoint_every_steps=4",
          "--config.preview.every_steps=4", "--config.data.vae_scale=0.5")


def _training_scalars(event_file: str) -> dict:
  import tensorflow as tf
  out = {}
  with fileio.local_file(event_file) as local:
    for event in tf.compat.v1.train.summary_iterator(local):
      for value in event.summary.value:
        out.setdefault(value.tag, set()).add(event.step)
  return out


@pytest.mark.slow
def test_extract_train_kill_resume_sample_evaluate_in_a_bucket(gcs, tmp_path):
  root = gcs("pod")
  vae = write_vae_dir(tmp_path / "vae")
  images = write_image_folder(tmp_path / "images")
  latents, run = f"{root}/latents", f"{root}/run"

  _run("fcdm_jax.extract_latents", f"--source=folder:{images}", f"--vae={vae}",
       f"--out={latents}", "--resolution=16", "--shard_size=4", "--batch_size=4")
  assert fileio.isfile(f"{latents}/manifest.json")
  assert not os.path.exists("gs:")   # nothing went to a local folder named after the URL

  # An uninterrupted run (local workdir, the same bucket data), then the killed one.
  _run("fcdm_jax.main", *_train_args(tmp_path / "straight", latents))
  proc = _run(*_train_args(run, latents), wait=False, step_delay=0.5)
  deadline = time.time() + 600
  # On an object store orbax marks a finished checkpoint with commit_success.txt.
  while not fileio.exists(f"{run}/checkpoints/4/commit_success.txt"):
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    assert time.time() < deadline, "checkpoint 4 did not appear in the bucket"
    time.sleep(0.3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _run("fcdm_jax.main", *_train_args(run, latents))
  assert "resumed from checkpoint" in out
  a, _, _ = restore_final(tmp_path / "straight")
  b, meta, _ = restore_final(run)
  assert int(a.step) == int(b.step) == 8 and meta["data_position"] == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  # Previews and TensorBoard events are in the bucket, and hold the training scalars.
  assert fileio.isfile(f"{run}/samples/step_00000008.png")
  events = [n for n in fileio.listdir(run) if n.startswith("events.out.tfevents")]
  assert len(events) == 2   # one per process that trained in the workdir
  tags = _training_scalars(f"{run}/{sorted(events)[-1]}")
  assert 8 in tags["loss"]

  # Sampling from the bucket's run into the bucket, then evaluation of that batch.
  samples = f"{root}/samples"
  _run("fcdm_jax.sample", f"--workdir={run}", f"--out={samples}", f"--vae={vae}",
       "--num_samples=4", "--batch_size=4", "--steps=2", "--cfg_scale=1", "--png")
  npz = f"{samples}/samples_4x16x16x3.npz"
  assert fileio.isfile(npz) and fileio.isfile(f"{samples}/png/000003.png")
  assert not fileio.exists(f"{samples}/parts")
  ref = tmp_path / "ref.npz"
  np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), np.uint8))
  inception = write_inception(tmp_path / "inception.safetensors")
  fileio.upload(inception, f"{root}/inception.safetensors")
  _run("fcdm_jax.evaluate", f"--samples={npz}", f"--ref={ref}",
       f"--inception={root}/inception.safetensors", "--metrics=fid,is",
       f"--out={root}/metrics.json", "--batch_size=4", "--split_size=2")
  metrics = fileio.read_text(f"{root}/metrics.json")
  assert '"fid"' in metrics and '"inception_score"' in metrics
