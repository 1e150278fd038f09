"""The README's first command, with fewer steps: every output it promises, and learning."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from helpers.training import seed_classifier

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_command_reduced(tmp_path, digit_classifier):
  workdir = tmp_path / "demo"
  seed_classifier(digit_classifier, workdir)   # the judge's classifier, trained once per run
  cmd = [sys.executable, "-m", "fcdm_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}", "--config.num_train_steps=60",
         "--config.optimizer.warmup_steps=10", "--config.log_every_steps=10",
         "--config.checkpoint_every_steps=30", "--config.preview.every_steps=30",
         "--config.preview.per_class=2", "--config.preview.steps=4",
         "--config.eval.num_samples=40", "--config.eval.steps=4", "--config.eval.batch_size=20"]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # Checkpoints at 30 and 60, TensorBoard events, grids, eval.json with finite numbers.
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [30, 60]
  events = list(workdir.glob("events.out.tfevents*"))
  assert events and events[0].stat().st_size > 0
  grids = sorted(p.name for p in (workdir / "samples").glob("*.png"))
  assert grids == ["step_00000030.png", "step_00000060.png"]
  result = json.loads((workdir / "eval.json").read_text())
  assert result["num_samples"] == 40
  assert np.isfinite(result["accuracy"]) and np.isfinite(result["frechet_distance"])
  # The loss falls: first logged interval against the last.
  losses = [float(line.split("loss=")[1].split(",")[0]) for line in proc.stderr.splitlines()
            if "loss=" in line and "learning_rate" in line]
  assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
