"""The preflight tables of docs/performance.md: every config on TPU slices (v5e-8, v5p-8,
v6e-8 and more), or on GPU nodes (4x RTX 4090, 8x A100 80 GB, 8x H100).

  python -m fcdm_jax.preflight_table            # compile what is missing, update the doc
  python -m fcdm_jax.preflight_table --jobs 2   # two rows at a time (one core each)
  python -m fcdm_jax.preflight_table --render   # only rewrite the doc's table from the JSON
  python -m fcdm_jax.preflight_table --table=gpu --jobs 2   # the GPU table

Run it from the repository's root: the results JSON (`--results`, default
docs/tpu_preflight.json or docs/gpu_preflight.json), the doc (`--doc`, default
docs/performance.md) and the config files are found relative to the directory it runs in.
Each entry is one `fcdm_jax.preflight` run of the training step (global batch 256) in its
own process, saved as soon as it finishes; entries already there are skipped, so the table
fills over several sittings.

GPU table (`fcdm_jax.perf.gpu_table`; needs the gpu extra): S, B, L, XL x 256, 512 px in
bf16 on 4x4090, 8xa100-80gb and 8xh100, each row a `--fit` preflight: the (remat,
gradient accumulation) with the lowest step bound that leaves 10% of the usable memory free,
its memory per GPU, the bound and the resource that binds it.

TPU table:

Entries: S, B, L, XL x 256, 512 px in bf16 with their default remat on v5e-8, v5p-8 and
v6e-8; XL/512 on a v5p-64 pod slice; for XL/256 on v5p-8 the sweep fp32/bf16 x remat
none/block/dots x dwconv_impl xla/shift/shift_vjp ('auto' is 'xla' on a TPU); and the rows
the defaults are chosen from: every config's remat candidates on v5e-8, and B/256 and L/256
in the other parameter layout (B on v5e-8, L on all three slices). Time figures are
roofline bounds derived from compiler counts, not measurements. The table's logic (rows,
choices, rendering) is `fcdm_jax.perf.tpu_table`.

Exit status 0 when the table is updated, 1 on an error (one `error:` line).
"""

from __future__ import annotations

from absl import flags

from fcdm_jax import cli
from fcdm_jax.perf import gpu_table, tpu_table

TABLES = {"tpu": tpu_table, "gpu": gpu_table}

_TABLE = flags.DEFINE_enum("table", "tpu", list(TABLES), "which table: TPU slices or GPU nodes")
_RESULTS = flags.DEFINE_string("results", None, "the JSON file of finished rows (default: "
                               f"{tpu_table.RESULTS} or {gpu_table.RESULTS})")
_DOC = flags.DEFINE_string("doc", None, f"the markdown file holding the table (default: "
                           f"{tpu_table.DOC})")
_RENDER = flags.DEFINE_bool("render", False, "only rewrite the doc's table")
_ONLY = flags.DEFINE_string("only", "", "compile only rows whose key contains this")
_SKIP = flags.DEFINE_string("skip", "", "leave out rows whose key contains this (two sittings "
                            "on disjoint rows, e.g. --only=shift and --skip=shift, can share "
                            "the JSON file)")
_MAX_ENTRIES = flags.DEFINE_integer("max_entries", 0, "stop after N rows (0 = all)")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "seconds per row")
_RETRY_ERRORS = flags.DEFINE_bool("retry_errors", False, "recompile rows that failed")
_JOBS = flags.DEFINE_integer("jobs", 1, "rows compiled side by side (each compile is mostly "
                             "one thread; mind the host memory: an XL compile holds a few GiB)")


def main(argv):
  del argv   # cli.run refuses positional arguments
  table = TABLES[_TABLE.value]
  table.update(_RESULTS.value or table.RESULTS, _DOC.value or table.DOC,
               render_only=_RENDER.value, only=_ONLY.value, skip=_SKIP.value,
               max_entries=_MAX_ENTRIES.value, timeout_s=_TIMEOUT.value,
               retry_errors=_RETRY_ERRORS.value, jobs=_JOBS.value,
               log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  cli.run(main)
