"""Text-conditioned FCDM through the system: captions precomputed into a folder, drawn per
(seed, step, position) with caption dropout, a tiny run that checkpoints, resumes
bit-identically after SIGKILL and previews, and sampling from typed prompts."""

import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fcdm_jax import config_base
from fcdm_jax.data import LatentDataset, make_source
from fcdm_jax.data.captions import CaptionTable, caption_folder
from fcdm_jax.models.text_encoder import load_text_encoder
from helpers.model_files import write_vae_dir
from helpers.runs import REPO, restore_final, run_main, wait_for_checkpoint
from helpers.text import captions_of, write_dataset_captions, write_text_encoder
from helpers.training import load_config, make_latent_dataset

TEXT = ["--config.model.condition=text", "--config.model.text_dim=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  latents = make_latent_dataset(root / "latents", count=32)
  labels = LatentDataset(latents).read(np.arange(32))["label"]
  encoder = write_text_encoder(root / "clip")
  captions = write_dataset_captions(root / "captions", labels, encoder)
  return dict(root=root, latents=latents, labels=labels, encoder=encoder, captions=captions)


def text_config(data, **overrides):
  config = load_config(**{"model.condition": "text", "model.text_dim": 16,
                          "data.path": data["latents"], "data.captions": data["captions"],
                          **overrides})
  return config


def test_caption_folder_holds_every_caption_and_the_empty_one(data):
  encoder = load_text_encoder(data["encoder"])
  table = CaptionTable(data["captions"], num_examples=32, dim=16)
  assert table.manifest["count"] == 64 and list(table.offsets[:3]) == [0, 2, 4]
  texts = table.texts()
  assert texts[:2] == captions_of(int(data["labels"][0]))
  np.testing.assert_allclose(table.embeddings[:2], encoder.encode(texts[:2]), atol=1e-6)
  np.testing.assert_allclose(table.empty, encoder.empty(), atol=1e-6)
  assert np.abs(table.embeddings[0] - table.embeddings[1]).max() > 1e-3
  with pytest.raises(ValueError, match="text_dim=8"):
    CaptionTable(data["captions"], dim=8)
  with pytest.raises(ValueError, match="for 32 examples, the dataset has 10"):
    CaptionTable(data["captions"], num_examples=10)
  with pytest.raises(FileNotFoundError, match="not a finished caption folder"):
    CaptionTable(str(data["root"]))


def test_text_preview_rows_spread_over_the_caption_folder(data):
  from fcdm_jax.train.preview import caption_rows
  table = CaptionTable(data["captions"], num_examples=32, dim=16)   # 2 captions each
  assert caption_rows(table.offsets, 4).tolist() == [0, 20, 42, 62]  # examples 0, 10, 21, 31
  assert caption_rows(table.offsets, 1).tolist() == [0]
  assert caption_rows(table.offsets[:4], 8).tolist() == [0, 2, 4]   # no more rows than examples


def test_each_step_draws_one_caption_per_example_or_the_empty_one(data):
  config = text_config(data, batch_size=16, **{"data.caption_dropout": 0.25})
  source = make_source(config)
  table = source.captions
  rows = np.stack([table.rows(source.indices(s), s, source.local_positions(s), source.seed, 16)
                   for s in range(40)])
  idx = np.stack([source.indices(s) for s in range(40)])
  kept = rows >= 0
  assert 0.15 < 1 - kept.mean() < 0.35                      # caption dropout ~ 25%
  assert np.all((rows[kept] >= table.offsets[idx][kept]) & (rows[kept] < table.offsets[idx + 1][kept]))
  assert len(set(rows[kept].tolist())) == 64                # every caption gets drawn
  batch = source.batch(3)
  assert batch["y"].shape == (16, 16) and batch["y"].dtype == np.float32
  np.testing.assert_array_equal(batch["y"], table.embed(rows[3]))
  # Two hosts load the halves of the same global batch.
  halves = [make_source(config, process_index=p, process_count=2).batch(3)["y"] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), batch["y"])


def test_a_text_model_needs_its_captions(data):
  config = text_config(data)
  config.data.captions = ""   # then the dataset's own: <data.path>/captions, absent here
  with pytest.raises(FileNotFoundError, match=f"{data['latents']}/captions/captions.json not "
                     "found"):
    make_source(config)
  config.data.update(source="embedded", path="")
  with pytest.raises(FileNotFoundError, match="no caption folder"):
    CaptionTable(caption_folder(config))


@pytest.mark.slow
def test_text_run_resumes_bit_identically_and_samples_from_prompts(data, tmp_path):
  args = [*TEXT, f"--config.data.captions={data['captions']}", "--config.num_train_steps=8",
          "--config.preview.every_steps=4"]
  code, out = run_main(tmp_path / "straight", data["latents"], *args)
  assert code == 0, out[-3000:]
  assert "preview rows: ['a " in out
  proc = run_main(tmp_path / "killed", data["latents"], *args,
                  "--config.checkpoint_every_steps=4", wait=False, step_delay=0.5)
  wait_for_checkpoint(tmp_path / "killed", 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out = run_main(tmp_path / "killed", data["latents"], *args,
                       "--config.checkpoint_every_steps=4")
  assert code == 0 and "resumed from checkpoint" in out, out[-3000:]
  overrides = {"model.condition": "text", "model.text_dim": 16}
  a, _, _ = restore_final(tmp_path / "straight", overrides)
  b, _, _ = restore_final(tmp_path / "killed", overrides)
  assert int(a.step) == int(b.step) == 8
  assert "text_embedder_1" in a.params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert (tmp_path / "killed" / "samples" / "step_00000008.png").is_file()

  # Sampling from typed prompts; the run's captions record the encoder, so none is passed.
  vae = write_vae_dir(tmp_path / "vae")
  out_dir = tmp_path / "samples"
  cmd = [sys.executable, "-m", "fcdm_jax.sample", f"--workdir={tmp_path / 'killed'}",
         f"--out={out_dir}", f"--vae={vae}", "--num_samples=4", "--batch_size=4",
         "--steps=2", "--cfg_scale=3", "--prompt=a red zero", "--prompt=a blue two"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out_dir / "samples_4x16x16x3.npz") as z:
    assert z["arr_0"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(z["arr_1"], [0, 1, 0, 1])
    images = z["arr_0"]
  assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 0  # other prompt
  # Class labels for a text model, or no prompt, are refused before any weights are read.
  from fcdm_jax.sampling import run as sampling_run
  config = text_config(data)
  with pytest.raises(ValueError, match="takes --prompt"):
    sampling_run.make_conditions(config, "balanced", ["a red zero"], data["encoder"], 4, 0)
  with pytest.raises(ValueError, match="pass --prompt=TEXT"):
    sampling_run.make_conditions(config, "random", [], data["encoder"], 4, 0)

def test_class_configs_are_untouched_by_the_text_fields():
  config = config_base.get_config("S", 256, "ddpm")
  assert config.model.condition == "class" and config.data.captions == ""


@pytest.mark.slow   # about 30 s each: a torch export, a PyTorch forward, a re-import
@pytest.mark.parametrize("embedder", ["linear", "mlp"])
def test_text_models_convert_both_ways_with_their_projection_keys(embedder):
  import jax.numpy as jnp
  from fcdm_jax import convert
  from fcdm_jax.models import FCDM
  model = FCDM(in_channels=4, hidden_size=8, depth=(1, 1, 1, 1, 1), condition="text",
               text_dim=16, text_embedder=embedder)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                      model.example_y(1))["params"]
  import flax.linen as nn
  params = jax.tree.map(np.asarray, nn.unbox(params))
  state_dict = convert.params_to_torch(params)
  extra = {"linear": ["proj"], "mlp": ["mlp.0", "mlp.2"]}[embedder]
  for k in (1, 2, 3):
    assert f"y_embedder_{k}.embedding_table.weight" not in state_dict
    for part in extra:
      assert state_dict[f"text_embedder_{k}.{part}.weight"].shape[1] in (16, 8 * 2 ** (k - 1))
  inferred = convert.infer_model(state_dict)
  assert (inferred.condition, inferred.text_embedder, inferred.text_dim) == ("text", embedder, 16)
  back = convert.params_from_torch(state_dict)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
