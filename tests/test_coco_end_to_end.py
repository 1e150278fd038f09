"""The MS-COCO text-to-image path end to end on a tiny COCO tree in the official layout
(train2014 and val2014, images and captions JSON), every model random and tiny: latents and
caption folders extracted, val2014 reference statistics made from its images, a text run
that trains on <latents>/captions by itself and scores FID-k and the CLIP score on
random val2014 captions at the end, and the same numbers from `evaluate --workdir`."""

import json
import math

import numpy as np
import pytest

from fcdm_jax import extraction
from fcdm_jax.evaluation import adm, fid_eval
from fcdm_jax.data.captions import CaptionTable
from fcdm_jax.evaluation.fid_eval import draw_captions
from helpers.image_files import IMAGES, KEPT, captions_of, write_coco
from helpers.model_files import RESOLUTION, write_inception, write_vae_dir, write_whole_clip
from helpers.runs import scalars
from helpers.text import write_text_encoder
from helpers.training import load_config


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  torch = pytest.importorskip("torch")
  from helpers.torch_compat import import_torchvision
  import_torchvision()
  transformers = pytest.importorskip("transformers")
  d = tmp_path_factory.mktemp("coco_e2e")
  root = write_coco(d / "coco", "train2014", seed=3)
  write_coco(d / "coco", "val2014", seed=4)
  dirs = dict(vae=write_vae_dir(d / "vae"), text=write_text_encoder(d / "text"),
              inception=write_inception(d / "inception.safetensors"), base=d)
  clip = d / "clip"
  clip.mkdir()
  write_whole_clip(torch, transformers, clip)
  dirs["clip"] = str(clip)
  for split in ("train2014", "val2014"):
    extraction.extract(f"coco:{root}", RESOLUTION, dirs["vae"], str(d / split),
                            split=split, batch_size=4, shard_size=4, num_workers=2,
                            text_encoder=dirs["text"], text_batch_size=8, progress=False)
  return dirs


@pytest.mark.slow
def test_coco_extract_reference_train_and_evaluate(coco, tmp_path):
  d = coco["base"]
  val_captions = str(d / "val2014" / "captions")
  table = CaptionTable(val_captions, num_examples=len(KEPT), dim=16)
  assert table.texts() == [c for i in KEPT for c in captions_of(i)]

  # The val2014 reference: statistics of its decodable images, centre-cropped.
  ref = str(tmp_path / "val_ref.npz")
  made = adm.make_reference(f"coco:{d / 'coco'}", ref, coco["inception"],
                                 resolution=RESOLUTION, split="val2014", batch_size=4,
                                 shard_size=4, progress=False)
  assert (made["num_images"], made["skipped"]) == (len(KEPT), len(IMAGES) - len(KEPT))
  with np.load(ref) as z:
    assert set(z.files) == {"mu", "sigma", "mu_s", "sigma_s"}
    assert z["mu"].shape == (2048,) and np.isfinite(z["sigma"]).all()

  # Training finds <data.path>/captions itself; FID-k and the CLIP score on val captions.
  from fcdm_jax.evaluation import make_evaluators
  from fcdm_jax.train.loop import train_and_evaluate
  workdir = str(tmp_path / "run")
  config = load_config(**{
      "model.condition": "text", "model.text_dim": 16, "data.path": str(d / "train2014"),
      "data.vae_scale": 0.5,
      "num_train_steps": 2, "checkpoint_every_steps": 2, "batch_size": 8,
      "preview.vae_dir": coco["vae"], "eval.enabled": True, "eval.kind": "fid",
      "eval.num_samples": 8, "eval.batch_size": 8, "eval.steps": 2, "eval.cfg_scale": 2.0,
      "eval.inception": coco["inception"], "eval.reference": ref,
      "eval.captions": val_captions, "eval.clip": coco["clip"]})
  summary = train_and_evaluate(config, workdir, make_evaluators=make_evaluators)
  assert int(summary["state"].step) == 2
  logged = scalars(workdir)
  for tag in ("eval/fid", "eval/sfid", "eval/inception_score", "eval/clip_score"):
    assert math.isfinite(logged[tag][2]), tag
  assert 0.0 <= logged["eval/clip_score"][2] <= 100.0

  # The evaluate command samples the same captions from the same noise: the same numbers.
  results = fid_eval.evaluate_run(workdir, ref, coco["inception"], 8, batch_size=8,
                                  captions=val_captions, clip=coco["clip"], progress=False)
  assert results["step"] == 2 and results["num_samples"] == 8
  for key, tag in (("fid", "eval/fid"), ("clip_score", "eval/clip_score")):
    np.testing.assert_allclose(results[key], logged[tag][2], rtol=1e-3)
  json.dumps(results, default=float)
  rows = draw_captions(table, config.seed, 6)
  assert rows.min() >= 0 and rows.max() < table.manifest["count"]


@pytest.mark.slow
def test_eval_captions_of_another_encoder_are_refused(coco, tmp_path):
  from fcdm_jax.evaluation.fid_eval import eval_captions
  other = write_text_encoder(tmp_path / "other", seed=1)
  extraction.extract(f"coco:{coco['base'] / 'coco'}", RESOLUTION, coco["vae"],
                          str(tmp_path / "val"), split="val2014", batch_size=4, shard_size=4,
                          num_workers=2, text_encoder=other, progress=False)
  config = load_config(**{"model.condition": "text", "model.text_dim": 16,
                          "data.path": str(coco["base"] / "train2014"),
                          "eval.captions": str(tmp_path / "val" / "captions")})
  with pytest.raises(ValueError, match="encode both with the same text encoder"):
    eval_captions(config)
