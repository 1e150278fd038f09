"""Every command answers a bad input the same way: a non-zero exit (preflight: 2), exactly
one `error:` line naming the problem, no traceback, and every file that was there before
byte-identical afterwards.

Each case runs the real command line (`python -m fcdm_jax.X ...`) in its own folder, which
holds copies of the small fixtures it names (a latent dataset, a run with a checkpoint, a
VAE, sample batches, ...); `{d}` in its arguments is that folder. Absl's flags are global to
a process, so each case is a process of its own: a command reads each flag once.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
from concurrent import futures

import numpy as np
import pytest

from fcdm_jax import config_checks, fileio
from fcdm_jax import data as data_lib
from fcdm_jax.data.latents import LatentDataset
from fcdm_jax.train import loop
from helpers.files import digests
from helpers.model_files import write_vae_dir
from helpers.runs import make_workdir
from helpers.training import TINY_CONFIG, load_config, make_latent_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = str(TINY_CONFIG)
PREFLIGHT = "preflight"   # the one command whose bad input exits 2 (1 is DOES NOT FIT)


def _case(command, args, error, *, fixtures=(), absent=()):
  return dict(command=command, args=list(args), error=error, fixtures=tuple(fixtures),
              absent=tuple(absent))


MAIN = ["--config=" + T, "--workdir={d}/new_run", "--config.data.path={d}/data"]
ON_RUN = ["--config=" + T, "--workdir={d}/run", "--config.data.path={d}/data"]
SAMPLE = ["--workdir={d}/run", "--num_samples=4"]
EVALUATE = ["--inception={d}/inception.pth", "--ref={d}/ref.npz"]
EXTRACT = ["--vae={d}/vae", "--resolution=16"]
PF = ["--config=" + T, "--topology=v5e-8"]
BENCH = ["--config=" + T, "--mode=train", "--compile_only"]

CASES = {
    # ---------------------------------------------------------------- main (training)
    "main_keep_checkpoints_0_on_a_run": _case(
        "main", ON_RUN + ["--config.keep_checkpoints=0"],
        r"config\.keep_checkpoints must be an integer >= 1, got 0", fixtures=("data", "run")),
    "main_keep_checkpoints_negative": _case(
        "main", MAIN + ["--config.keep_checkpoints=-1"],
        r"config\.keep_checkpoints must be an integer >= 1, got -1", fixtures=("data",)),
    "main_num_train_steps_below_the_checkpoint": _case(
        "main", ON_RUN + ["--config.num_train_steps=2"],
        r"num_train_steps=2 is below .*checkpoint \(7 in ", fixtures=("data", "run")),
    "main_negative_batch": _case(
        "main", MAIN + ["--config.batch_size=-8"],
        r"config\.batch_size must be an integer >= 1, got -8", fixtures=("data",)),
    "main_batch_the_devices_do_not_divide": _case(
        "main", MAIN + ["--config.batch_size=6"],
        r"batch_size 6 is not divisible by the data-parallel size 4", fixtures=("data",)),
    "main_micro_batches_the_devices_do_not_divide": _case(
        "main", MAIN + ["--config.grad_accum_steps=4"],
        r"batch_size 8 is not divisible by grad_accum_steps 4 x the data-parallel size 4",
        fixtures=("data",)),
    "main_unwritable_workdir": _case(
        "main", ["--config=" + T, "--workdir={d}/a_file/run", "--config.data.path={d}/data"],
        r"workdir '.*a_file/run' is not writable", fixtures=("data", "a_file")),
    "main_missing_data": _case(
        "main", ["--config=" + T, "--workdir={d}/new_run", "--config.data.path={d}/nowhere"],
        r"nowhere"),
    "main_model_that_does_not_match_the_checkpoint": _case(
        "main", ON_RUN + ["--config.num_train_steps=9", "--config.model.hidden_size=16"],
        r"other model fields.*hidden_size", fixtures=("data", "run")),
    "main_misspelled_field": _case(
        "main", MAIN + ["--config.batchsize=4"],
        r"--config\.batchsize: config has no field 'batchsize' \(did you mean 'batch_size'\?\)",
        fixtures=("data",)),
    "main_misspelled_nested_field": _case(
        "main", MAIN + ["--config.sample.no_such=1"],
        r"config\.sample has no field 'no_such'; its fields: .*cfg_scale", fixtures=("data",)),
    "main_missing_config_file": _case(
        "main", ["--config={d}/no_such_config.py", "--workdir={d}/new_run"],
        r"no_such_config\.py"),
    "main_config_file_with_a_syntax_error": _case(
        "main", ["--config={d}/broken_config.py", "--workdir={d}/new_run"],
        r"broken_config\.py|invalid syntax|SyntaxError", fixtures=("broken_config.py",)),
    "main_unknown_dtype": _case(
        "main", MAIN + ["--config.model.dtype=float99"],
        r"config\.model\.dtype='float99' is not one of float32, bfloat16", fixtures=("data",)),
    "main_learning_rate_nan": _case(
        "main", MAIN + ["--config.optimizer.learning_rate=nan"],
        r"config\.optimizer\.learning_rate must be a finite number > 0, got nan",
        fixtures=("data",)),
    "main_learning_rate_zero": _case(
        "main", MAIN + ["--config.optimizer.learning_rate=0.0"],
        r"config\.optimizer\.learning_rate must be a finite number > 0, got 0\.0",
        fixtures=("data",)),
    "main_latent_shard_cut_short": _case(
        "main", ["--config=" + T, "--workdir={d}/new_run", "--config.data.path={d}/data_cut"],
        r"data_cut/shard-00000\.npy is cut short", fixtures=("data_cut",)),
    "main_manifest_cut_short": _case(
        "main", ["--config=" + T, "--workdir={d}/new_run",
                 "--config.data.path={d}/data_bad_manifest"],
        r"data_bad_manifest/manifest\.json is damaged \(not JSON", fixtures=("data_bad_manifest",)),
    # ---------------------------------------------------------------- sample
    "sample_zero_samples": _case(
        "sample", ["--workdir={d}/run", "--num_samples=0", "--out={d}/samples"],
        r"--num_samples must be a positive integer, got 0", fixtures=("run",)),
    "sample_out_is_a_file": _case(
        "sample", SAMPLE + ["--out={d}/a_file"], r"--out=.*a_file is a file",
        fixtures=("run", "a_file")),
    "sample_out_under_a_file": _case(
        "sample", SAMPLE + ["--out={d}/a_file/samples"], r"a_file/samples cannot be made: .*a file",
        fixtures=("run", "a_file")),
    "sample_out_is_the_workdir": _case(
        "sample", SAMPLE + ["--out={d}/run"], r"--out=.*/run is also an input", fixtures=("run",)),
    "sample_missing_workdir": _case(
        "sample", ["--workdir={d}/no_run", "--num_samples=4", "--out={d}/samples"],
        r"workdir .*no_run does not exist"),
    "sample_unknown_dtype": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--config=" + T,
                            "--config.model.dtype=float99"],
        r"config\.model\.dtype='float99' is not one of", fixtures=("run",),
        absent=("samples",)),
    "sample_latent_model_without_vae": _case(
        "sample", SAMPLE + ["--out={d}/samples"], r"--vae must name the SD-VAE directory",
        fixtures=("run",)),
    "sample_bad_labels": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--vae={d}/vae", "--labels=cats"],
        r"--labels 'cats'", fixtures=("run", "vae")),
    "sample_cfg_scale_nan": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--vae={d}/vae", "--cfg_scale=nan"],
        r"--cfg_scale must be a finite number \(1 = no guidance\), got nan",
        fixtures=("run", "vae"), absent=("samples",)),
    "sample_cfg_interval_reversed": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--cfg_interval=261,100"],
        r"--cfg_interval=\(261, 100\) is reversed: it must be LOW,HIGH with LOW <= HIGH",
        fixtures=("run",), absent=("samples",)),
    "sample_cfg_interval_outside_the_time": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--cfg_interval=100,1000"],
        r"--cfg_interval=\(100, 1000\) lies outside the objective's time range \[0, 999\]",
        fixtures=("run",), absent=("samples",)),
    "sample_cfg_interval_not_a_pair": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--config=" + T,
                            "--config.sample.cfg_interval=0.5"],
        r"config\.sample\.cfg_interval must be two numbers LOW,HIGH", fixtures=("run",),
        absent=("samples",)),
    "sample_multistep_solver_with_one_step": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--vae={d}/vae", "--sampler=unipc",
                            "--steps=1"],
        r"unipc is a multistep solver: steps must be an integer >= 2", fixtures=("run", "vae"),
        absent=("samples",)),
    "sample_time_shift_zero": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--vae={d}/vae", "--config=" + T,
                            "--sampler=dpmpp_2m", "--steps=10", "--config.sample.time_shift=0"],
        r"time_shift must be a finite number > 0 \(1 = no shift\), got 0\.0",
        fixtures=("run", "vae"), absent=("samples",)),
    "sample_sampler_of_another_objective": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--vae={d}/vae", "--sampler=sde"],
        r"sampler 'sde' does not serve the 'ddpm' objective; its samplers are "
        r"\('ddpm', 'ddim', 'dpmpp_2m', 'unipc'\)", fixtures=("run", "vae"), absent=("samples",)),
    "sample_unknown_sampler_setting": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--config=" + T, "--config.sample.no_such_key=1"],
        r"config\.sample has no field 'no_such_key'; its fields: .*cfg_interval.*time_shift",
        fixtures=("run",), absent=("samples",)),
    "sample_unknown_sampler": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--sampler=magic"], r"--sampler.*magic"),
    "sample_unknown_flag": _case(
        "sample", SAMPLE + ["--out={d}/samples", "--num_sample=4"],
        r"unknown flag --num_sample \(did you mean --num_samples\?\)"),
    # ---------------------------------------------------------------- evaluate
    "evaluate_run_with_a_reversed_cfg_interval": _case(
        "evaluate", EVALUATE + ["--workdir={d}/run", "--cfg_interval=0.9,0.1"],
        r"--cfg_interval=\(0\.9, 0\.1\) is reversed", fixtures=("run", "ref.npz",
                                                                "inception.pth")),
    "evaluate_out_is_the_sample_batch": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--out={d}/samples.npz"],
        r"--out=.*samples\.npz is also an input", fixtures=("samples.npz", "ref.npz",
                                                             "inception.pth")),
    "evaluate_out_exists": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--out={d}/metrics.json"],
        r"metrics\.json exists; pass --overwrite", fixtures=("samples.npz", "ref.npz",
                                                           "inception.pth", "metrics.json")),
    "evaluate_out_is_a_folder": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--out={d}/a_folder", "--overwrite"],
        r"a_folder is a folder", fixtures=("samples.npz", "ref.npz", "inception.pth",
                                           "a_folder")),
    "evaluate_out_not_writable": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--out={d}/a_file/m.json"],
        r"a_file/m\.json cannot be written", fixtures=("samples.npz", "ref.npz",
                                                     "inception.pth", "a_file")),
    "evaluate_batch_size_0": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--batch_size=0"],
        r"--batch_size must be a positive integer, got 0", fixtures=("samples.npz", "ref.npz",
                                                                    "inception.pth")),
    "evaluate_one_sample_batch": _case(
        "evaluate", EVALUATE + ["--samples={d}/one_sample.npz", "--metrics=fid"],
        r"one_sample\.npz holds 1 image; fid need at least 2",
        fixtures=("one_sample.npz", "ref.npz", "inception.pth")),
    "evaluate_missing_samples": _case(
        "evaluate", EVALUATE + ["--samples={d}/nothing.npz"], r"nothing\.npz",
        fixtures=("ref.npz", "inception.pth")),
    "evaluate_two_modes": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--workdir={d}/run"],
        r"pass exactly one of --samples", fixtures=("samples.npz", "ref.npz", "inception.pth")),
    "evaluate_unknown_metric": _case(
        "evaluate", EVALUATE + ["--samples={d}/samples.npz", "--metrics=fid,kid"],
        r"unknown metrics \['kid'\]", fixtures=("samples.npz", "ref.npz", "inception.pth")),
    "evaluate_missing_inception_flag": _case(
        "evaluate", ["--samples={d}/samples.npz", "--ref={d}/ref.npz"],
        r"--inception is required", fixtures=("samples.npz", "ref.npz")),
    # ---------------------------------------------------------------- extract_latents
    "extract_nothing_decodes": _case(
        "extract_latents", EXTRACT + ["--source=folder:{d}/images", "--out={d}/latents"],
        r"no image of folder:.*images could be decoded \(2 skipped",
        fixtures=("images", "vae"), absent=("latents/manifest.json", "latents/shard-00000.npy")),
    "extract_out_is_a_file": _case(
        "extract_latents", EXTRACT + ["--source=folder:{d}/images", "--out={d}/a_file"],
        r"--out=.*a_file is a file", fixtures=("images", "vae", "a_file")),
    "extract_out_is_the_source": _case(
        "extract_latents", EXTRACT + ["--source=folder:{d}/images", "--out={d}/images"],
        r"--out=.*images is also an input", fixtures=("images", "vae")),
    "extract_out_under_a_file": _case(
        "extract_latents", EXTRACT + ["--source=folder:{d}/images", "--out={d}/a_file/lat"],
        r"cannot be made: .*a_file is a file", fixtures=("images", "vae", "a_file")),
    "extract_batch_size_0": _case(
        "extract_latents", EXTRACT + ["--source=folder:{d}/images", "--out={d}/latents",
                                      "--batch_size=0"],
        r"--batch_size must be a positive integer, got 0", fixtures=("images", "vae")),
    "extract_unknown_source_kind": _case(
        "extract_latents", EXTRACT + ["--source=ftp:{d}/images", "--out={d}/latents"],
        r"unknown --source 'ftp:", fixtures=("images", "vae")),
    "extract_missing_vae": _case(
        "extract_latents", ["--vae={d}/no_vae", "--source=folder:{d}/images",
                            "--out={d}/latents"], r"no_vae", fixtures=("images",)),
    # ---------------------------------------------------------------- export_torch
    "export_out_is_a_folder": _case(
        "export_torch", ["--workdir={d}/run", "--out={d}/a_folder.pt"],
        r"a_folder\.pt is a folder", fixtures=("run", "a_folder.pt")),
    "export_out_exists": _case(
        "export_torch", ["--workdir={d}/run", "--out={d}/model.pt"],
        r"model\.pt exists; pass --overwrite", fixtures=("run", "model.pt")),
    "export_out_not_writable": _case(
        "export_torch", ["--workdir={d}/run", "--out={d}/a_file/model.pt"],
        r"a_file/model\.pt cannot be written", fixtures=("run", "a_file")),
    "export_unknown_format": _case(
        "export_torch", ["--workdir={d}/run", "--out={d}/model.onnx"],
        r"--out must end in \.pt .* or \.safetensors", fixtures=("run",)),
    "export_positional_argument": _case(
        "export_torch", ["--workdir={d}/run", "--out={d}/model.pt", "model.pt"],
        r"unexpected arguments \['model\.pt'\]", fixtures=("run",)),
    "export_missing_out": _case("export_torch", ["--workdir={d}/run"], r"--out is required"),
    "export_missing_step": _case(
        "export_torch", ["--workdir={d}/run", "--step=99", "--out={d}/model.pt"],
        r"no checkpoint at step 99", fixtures=("run",)),
    # ---------------------------------------------------------------- preflight (exit 2)
    "preflight_sample_batch_0": _case(
        PREFLIGHT, PF + ["--sample_batch=0"], r"--sample_batch must be a positive integer, got 0"),
    "preflight_sample_batch_negative": _case(
        PREFLIGHT, PF + ["--sample_batch=-8"], r"--sample_batch must be a positive integer, got -8"),
    "preflight_batch_0": _case(
        PREFLIGHT, PF + ["--batch=0"], r"--batch must be a positive integer, got 0"),
    "preflight_missing_topology": _case(
        PREFLIGHT, ["--config=" + T], r"--config and --topology are required"),
    "preflight_missing_config": _case(
        PREFLIGHT, ["--topology=v5e-8"], r"--config and --topology are required"),
    "preflight_flag_typo": _case(
        PREFLIGHT, PF + ["--topolgy=v5e-8"], r"unknown flag --topolgy \(did you mean --topology\?\)"),
    "preflight_unknown_topology": _case(PREFLIGHT, ["--config=" + T, "--topology=v99-8"], r"v99-8"),
    "preflight_json_exists": _case(
        PREFLIGHT, PF + ["--json={d}/report.json"], r"--json=.*report\.json exists; pass --overwrite",
        fixtures=("report.json",)),
    "preflight_json_is_a_folder": _case(
        PREFLIGHT, PF + ["--json={d}/a_folder"], r"--json=.*a_folder is a folder",
        fixtures=("a_folder",)),
    "preflight_unknown_dtype": _case(
        PREFLIGHT, PF + ["--config.model.dtype=float99"], r"config\.model\.dtype='float99'"),
    # ---------------------------------------------------------------- bench
    "bench_more_devices_than_there_are": _case(
        "bench", BENCH + ["--num_devices=99"], r"--num_devices=99: this machine has 4 cpu devices"),
    "bench_negative_devices": _case(
        "bench", BENCH + ["--num_devices=-1", "--batch=6"], r"--num_devices=-1: this machine has 4"),
    "bench_negative_batch": _case(
        "bench", BENCH + ["--batch=-8"], r"batch >= 1; got .*-8"),
    "bench_batch_the_devices_do_not_divide": _case(
        "bench", BENCH + ["--batch=6"], r"batch 6 must be positive and divisible by the 4"),
    "bench_json_is_a_folder": _case(
        "bench", BENCH + ["--json={d}/a_folder"], r"--json=.*a_folder is a folder",
        fixtures=("a_folder",)),
    "bench_json_exists": _case(
        "bench", BENCH + ["--json={d}/report.json"], r"report\.json exists; pass --overwrite",
        fixtures=("report.json",)),
    "bench_unknown_dtype": _case(
        "bench", BENCH + ["--config.model.dtype=float99"], r"config\.model\.dtype='float99'"),
    "bench_input_missing_data": _case(
        "bench", ["--config=" + T, "--mode=input", "--config.data.path={d}/nowhere"],
        r"latent dataset directory .*nowhere does not exist"),
    "bench_missing_config": _case("bench", ["--mode=train"], r"--config is required"),
}


# ------------------------------------------------------------------------------ fixtures


def _write_fixtures(root):
  """One copy of every fixture a case may name, in `root`."""
  data = make_latent_dataset(root / "data", count=16, shape=(8, 8, 4), num_classes=4,
                             shard_size=8)
  make_workdir(root / "run", load_config(**{"data.path": data}))
  cut = root / "data_cut"
  shutil.copytree(data, cut)
  shard = cut / "shard-00000.npy"
  shard.write_bytes(shard.read_bytes()[:-100])
  bad = root / "data_bad_manifest"
  shutil.copytree(data, bad)
  manifest = bad / "manifest.json"
  manifest.write_bytes(manifest.read_bytes()[:40])
  (root / "a_file").write_text("a file, not a folder\n")
  (root / "a_folder").mkdir()
  (root / "a_folder" / "keep.txt").write_text("kept\n")
  (root / "a_folder.pt").mkdir()
  (root / "metrics.json").write_text('{"fid": 1.0}\n')
  (root / "report.json").write_text('{"old": true}\n')
  (root / "model.pt").write_bytes(os.urandom(64))
  (root / "broken_config.py").write_text("def get_config(:\n  return None\n")
  # Inception weights that do not load: a metric refused before the network runs says so
  # in its own words, not in the loader's.
  (root / "inception.pth").write_bytes(os.urandom(256))
  rng = np.random.default_rng(0)
  np.savez(root / "samples.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), np.uint8))
  np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), np.uint8))
  np.savez(root / "one_sample.npz", arr_0=rng.integers(0, 256, (1, 16, 16, 3), np.uint8))
  write_vae_dir(root / "vae")
  (root / "images" / "cat").mkdir(parents=True)
  (root / "images" / "cat" / "a.png").write_bytes(b"\x89PNG not really")
  (root / "images" / "cat" / "b.jpg").write_bytes(os.urandom(300))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input_fixtures")
  _write_fixtures(root)
  return root


def _run(command, args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  return subprocess.run([sys.executable, "-m", f"fcdm_jax.{command}", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(request, fixtures, tmp_path_factory):
  """{case: (its folder, digests before, the finished process)} of the selected cases, run
  two at a time (each is one process, mostly its start-up)."""
  names = sorted({item.callspec.params["name"] for item in request.session.items
                  if item.module is request.module and hasattr(item, "callspec")
                  and "name" in item.callspec.params})
  folders = {}
  for name in names:
    folder = folders[name] = tmp_path_factory.mktemp(name)
    for fixture in CASES[name]["fixtures"]:
      source, target = fixtures / fixture, folder / fixture
      if source.is_dir():
        shutil.copytree(source, target)
      else:
        shutil.copy2(source, target)
  before = {name: digests(folders[name]) for name in names}

  def run(name):
    case = CASES[name]
    return _run(case["command"], [a.format(d=folders[name]) for a in case["args"]])

  with futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
    results = dict(zip(names, pool.map(run, names)))
  return {name: (folders[name], before[name], results[name]) for name in names}


def test_the_table_covers_every_command_with_at_least_40_cases():
  commands = {c["command"] for c in CASES.values()}
  assert commands == {"main", "sample", "evaluate", "extract_latents", "export_torch",
                      PREFLIGHT, "bench"}
  assert len(CASES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_error_line_and_changes_no_file(name, outcomes):
  folder, before, result = outcomes[name]
  case = CASES[name]
  output = result.stdout + result.stderr
  expected = 2 if case["command"] == PREFLIGHT else 1
  assert result.returncode == expected, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, output[-3000:]
  assert re.search(case["error"], errors[0]), errors[0]
  after = digests(folder)
  assert {k: after.get(k) for k in before} == before   # every file there before, unchanged
  for path in case["absent"]:
    assert not (folder / path).exists(), path


# Config values the table does not run as commands: each named by its field.
BAD_VALUES = [
    ("optimizer.learning_rate", float("inf"), r"optimizer\.learning_rate must be a finite "
     r"number > 0, got inf"),
    ("optimizer.learning_rate", -1e-4, r"learning_rate must be a finite number > 0"),
    ("num_train_steps", 0, r"config\.num_train_steps must be an integer >= 1, got 0"),
    ("log_every_steps", -2, r"config\.log_every_steps must be an integer >= 1"),
    ("checkpoint_every_steps", 0, r"config\.checkpoint_every_steps must be an integer >= 1"),
    ("optimizer.b2", 1.0, r"config\.optimizer\.b2 must be a finite number >= 0 and < 1"),
    ("optimizer.eps", 0.0, r"config\.optimizer\.eps must be a finite number > 0"),
    ("optimizer.warmup_steps", -5, r"config\.optimizer\.warmup_steps must be an integer >= 0"),
    ("optimizer.schedule", "linear", r"config\.optimizer\.schedule='linear' is not one of "
     r"constant, cosine"),
    ("ema_decay", 1.5, r"config\.ema_decay must be a finite number >= 0 and <= 1, got 1\.5"),
    ("model.remat", "all", r"config\.model\.remat='all' is not one of block, dots"),
    ("model.dwconv_impl", "fft", r"config\.model\.dwconv_impl='fft'"),
    ("model.depth", (1, 0, 1, 1, 1), r"config\.model\.depth must be a non-empty list"),
    ("model.hidden_size", 0, r"config\.model\.hidden_size must be an integer >= 1"),
    ("data.vae_scale", float("nan"), r"config\.data\.vae_scale must be a finite number > 0"),
    ("sample.steps", 0, r"config\.sample\.steps must be an integer >= 1, got 0"),
    ("sample.cfg_interval", (300.0, 100.0), r"config\.sample\.cfg_interval=\(300, 100\) is "
     r"reversed"),
    ("preview.cfg_interval", (100.0, 2000.0), r"config\.preview\.cfg_interval=\(100, 2000\) "
     r"lies outside the objective's time range \[0, 999\]"),
    ("eval.cfg_interval", (0.5,), r"config\.eval\.cfg_interval must be two numbers"),
    ("grad_accum_steps", 0, r"config\.grad_accum_steps must be an integer >= 1, got 0"),
    ("grad_accum_steps", 3, r"config\.batch_size=8 is not divisible by "
     r"config\.grad_accum_steps=3"),
]


@pytest.mark.parametrize("field,value,error", BAD_VALUES)
def test_check_config_names_the_field(field, value, error):
  config = load_config()
  with config.unlocked():
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ValueError, match=error):
    config_checks.check_config(config, training=True)


def test_check_config_passes_every_shipped_config_and_skips_training_fields_for_sampling():
  for path in sorted((pathlib.Path(REPO) / "configs").glob("*.py")):
    if path.name != "__init__.py":
      config_checks.check_config(load_config(path), training=True)
  config = load_config(**{"keep_checkpoints": 0, "optimizer.learning_rate": float("nan")})
  config_checks.check_config(config)   # sampling does not use them
  with pytest.raises(ValueError, match="keep_checkpoints"):
    config_checks.check_config(config, training=True)


# ------------------------------------------------------------------------------ in-process


def test_a_latent_shard_cut_short_or_a_damaged_manifest_is_refused_at_open(tmp_path):
  data = make_latent_dataset(tmp_path / "data", count=16, shard_size=8)
  shard = tmp_path / "data" / "shard-00001.npy"
  whole = shard.read_bytes()
  shard.write_bytes(whole[:-1])
  with pytest.raises(ValueError, match=r"shard-00001\.npy is cut short: \d+ bytes, its header "
                     r"says 8 records"):
    LatentDataset(data)
  shard.write_bytes(whole[:20])   # not even a whole header
  with pytest.raises(ValueError, match=r"shard-00001\.npy is not a readable \.npy file"):
    LatentDataset(data)
  shard.write_bytes(whole)
  assert len(LatentDataset(data)) == 16
  manifest = tmp_path / "data" / "manifest.json"
  manifest.write_bytes(manifest.read_bytes()[:30])
  with pytest.raises(ValueError, match=r"manifest\.json is damaged \(not JSON"):
    LatentDataset(data)


def test_check_output_folder(tmp_path):
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="is a file; name a folder"):
    fileio.check_output_folder(str(tmp_path / "a_file"))
  with pytest.raises(ValueError, match=r"cannot be made: .*a_file is a file"):
    fileio.check_output_folder(str(tmp_path / "a_file" / "out"))
  with pytest.raises(ValueError, match="is also an input"):
    fileio.check_output_folder(str(tmp_path / "in") + "/", inputs=("", str(tmp_path / "in")))
  fileio.check_output_folder(str(tmp_path / "new" / "deeper"))   # nothing is created
  fileio.check_output_folder(str(tmp_path))                      # an existing folder: resumed
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.slow
def test_a_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch):
  data = make_latent_dataset(tmp_path / "data")
  config = load_config(**{"data.path": data, "checkpoint_every_steps": 4})
  real_make_source = data_lib.make_source

  def poisoned(*args, **kwargs):
    source = real_make_source(*args, **kwargs)
    clean = source.batch
    source.batch = lambda step: dict(clean(step), x=np.full_like(clean(step)["x"], np.nan))
    return source

  monkeypatch.setattr(data_lib, "make_source", poisoned)
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "non-finite at step 1" in message and "no checkpoint had been written yet" in message
  assert "step None" not in message and "intact" not in message
