"""In-training evaluation as hooks: a tiny real run writes FID-k and the demo judge's
numbers to TensorBoard every N steps (two evaluators named by config.eval.kind), and a
setup that cannot be evaluated fails before training."""

import glob

import numpy as np
import pytest

from fcdm_jax import sharding
from fcdm_jax.demo.digit_judge import DemoJudge
from fcdm_jax.evaluation import EVALUATORS, make_evaluators
from fcdm_jax.evaluation import fid_eval
from fcdm_jax.evaluation.fid_eval import FidEvaluator
from fcdm_jax.train import loop

from helpers.model_files import write_inception
from helpers.runs import scalars
from helpers.training import seed_classifier, tiny_demo_config


def fid_run_config(tmp_path):
  """A few-channel FCDM on the embedded digits, FID-8 every 2 of its 4 steps."""
  rng = np.random.default_rng(0)
  reference = tmp_path / "ref.npz"
  np.savez(reference, arr_0=rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
  config = tiny_demo_config("ddpm")
  config.update(batch_size=8, num_train_steps=4, log_every_steps=2, checkpoint_every_steps=4)
  config.optimizer.warmup_steps = 1
  config.preview.every_steps = 0
  inception = write_inception(tmp_path / "inception.safetensors")
  config.eval.update(kind="fid", every_steps=2, num_samples=8, batch_size=8, sampler="ddim",
                     steps=2, cfg_scale=1.0, inception=inception, reference=str(reference))
  return config


def test_eval_kind_names_one_evaluator_or_several(tmp_path):
  config = fid_run_config(tmp_path)
  mesh = sharding.create_mesh(config)
  [fid] = make_evaluators(config, mesh, str(tmp_path / "run"))
  assert isinstance(fid, FidEvaluator) and fid.every_steps == 2
  config.eval.kind = " demo, fid "
  demo, fid = make_evaluators(config, mesh, str(tmp_path / "run"))
  assert isinstance(demo, DemoJudge) and isinstance(fid, FidEvaluator)
  config.eval.enabled = False
  assert make_evaluators(config, mesh, str(tmp_path / "run")) == []
  config.eval.enabled = True
  for kind, message in (("fid,fid", "names an evaluator twice"), (" ,", "names no evaluator"),
                        ("fid,clip", "unknown config.eval.kind 'clip'; expected one or more")):
    config.eval.kind = kind
    with pytest.raises(ValueError, match=message) as error:
      make_evaluators(config, mesh, str(tmp_path / "run"))
    assert kind == "fid,fid" or str(tuple(EVALUATORS)) in str(error.value)


@pytest.mark.slow
def test_two_evaluators_write_to_tensorboard_every_n_steps(tmp_path, digit_classifier):
  config = fid_run_config(tmp_path)
  config.eval.kind = "fid,demo"
  workdir = str(tmp_path / "run")
  seed_classifier(digit_classifier, workdir)
  summary = loop.train_and_evaluate(config, workdir, make_evaluators=make_evaluators)
  written = scalars(workdir)
  for tag in ("eval/fid", "eval/sfid", "eval/inception_score", "eval/accuracy",
              "eval/frechet_distance"):
    assert sorted(written[tag]) == [2, 4], (tag, written.get(tag))
    assert all(np.isfinite(v) for v in written[tag].values())
  assert all(v > 0 for v in written["eval/fid"].values())
  fid, demo = summary["eval"]
  assert fid["step"] == 4 and fid["fid"] == pytest.approx(written["eval/fid"][4], rel=1e-5)
  assert demo["step"] == 4 and demo["accuracy"] == written["eval/accuracy"][4]
  # Each reports its cost: DDIM, 2 steps, unguided.
  two = {"evaluations_per_image": 2, "evaluations_counted": "time grid"}
  assert fid["cost"] == demo["cost"] == demo["conditional"]["cost"] == two

  # `evaluate --workdir` of the run, guided on an interval: 4 conditional evaluations (steps
  # 999, 666, 333, 0) and the null rows at the two inside [300, 700].
  results = fid_eval.evaluate_run(workdir, config.eval.reference, config.eval.inception, 8,
                                  batch_size=8, sampler="ddim", steps=4, cfg_scale=2.0,
                                  cfg_interval="300,700", progress=False)
  assert results["cost"] == {"evaluations_per_image": 6, "evaluations_counted": "time grid"}
  assert np.isfinite(results["fid"])


def test_bad_evaluation_setups_fail_before_training(tmp_path):
  config = fid_run_config(tmp_path)
  config.eval.inception = str(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match="config.eval.inception=.*missing.pth"):
    loop.train_and_evaluate(config, str(tmp_path / "a"), make_evaluators=make_evaluators)
  config = fid_run_config(tmp_path)
  config.eval.kind = "clip"
  with pytest.raises(ValueError, match="unknown config.eval.kind 'clip'"):
    loop.train_and_evaluate(config, str(tmp_path / "b"), make_evaluators=make_evaluators)
  with pytest.raises(ValueError, match="no evaluators were passed"):
    loop.train_and_evaluate(fid_run_config(tmp_path), str(tmp_path / "c"))
  assert not glob.glob(str(tmp_path / "*" / "checkpoints" / "*"))


def test_train_imports_no_application_module():
  """The training core knows no evaluator, CLI or demo: they plug into it from above."""
  import ast
  import pathlib
  applications = ("fcdm_jax.evaluation", "fcdm_jax.sample", "fcdm_jax.evaluate", "fcdm_jax.main",
                  "fcdm_jax.extract_latents", "fcdm_jax.bench")
  train = pathlib.Path(loop.__file__).parent
  for path in train.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
               if isinstance(node, ast.ImportFrom) else [])
      bad = [n for n in names if any(n == a or n.startswith(a + ".") for a in applications)]
      assert not bad, f"{path.name} imports {bad}"
