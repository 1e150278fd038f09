"""Benchmark FCDM training steps and sampling forwards, optionally side by side with PyTorch.

  python -m fcdm_jax.bench --config=configs/s_256.py --batch=8 --mode=both --vs-torch

Measured the same way every time: compile seconds (trace + lower + XLA compile), warm-up
steps, then `--repeats` timed steps (median, min and max), images/s, peak memory, FLOPs
and MFU. The training step is the real one (`fcdm_jax.train.step`: objective loss,
AdamW, EMA) on a state with the training layout and shardings (`state_layout`), filled
with random values on the host: compiling the random initialiser would only add minutes.

FLOPs are counted two ways, model FLOPs (which MFU uses) and XLA's whole-step count
(`fcdm_jax.perf.benchmark` says how).

`--vs-torch` runs the published-structure PyTorch module (`fcdm_jax.torch_fcdm`) at the
same batch, precision (bf16 = autocast) and remat (any remat other than 'none' = the
published per-block checkpointing), alternating one JAX step and one PyTorch step so that
both see the same machine load, and prints JAX speed / PyTorch speed. PyTorch runs the
whole batch on one device: compare chips with `--num_devices=1`.

On a shared machine, pin the process (`taskset -c 1 python -m fcdm_jax.bench ...`): both
frameworks then get the same core, and OpenMP's synchronisation does not collapse when
another process takes a core (docs/performance.md). Each step also records how busy
other processes kept the machine, and ratios over quiet steps are reported.

`--mode=input` times the host side of the data sources instead: examples/s
per host at the run's batch and the cores used, for the config's data or synthetic
datasets of every kind, with grain's reader beside ours on the latent shards.
`--mode=dwconv` times the depthwise conv formulations at the config's level shapes.

The command is `__main__.py` (flags and a `main`); the library it calls is `fcdm_jax.perf`
(`benchmark.run`, `input_bench.run_input`, `dwconv_study.dwconv_study`), and the programs
it times are built by `fcdm_jax.programs`, as the TPU preflight's are.
"""
