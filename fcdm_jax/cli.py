"""What every command does the same way: start, fail and end.

`run(main)` is `absl.app.run(main)` with three guarantees:
- A mistake in the command line (an unknown flag, a misspelled `--config.x`, a bad value,
  a config file that is missing or does not load) is one `error:` line naming the flag and,
  for a misspelling, the closest known one; no traceback.
- A user error raised by the command (`USER_ERRORS`: a bad value, a missing, existing or
  unwritable path, a mismatch with a checkpoint or dataset) is one `error:` line; a
  traceback only with `--verbose_errors` (a bug's traceback is always shown).
- A multi-process run ends with a barrier every process reaches and an explicit
  `jax.distributed.shutdown()`, in that order, on success and on a user error alike (every
  host runs the same checks, so they agree), so a finished run exits 0 on every host
  however late each gets there (JAX's own exit-time shutdown races the other hosts'). The
  barrier is the coordination service's, with a timeout (`FINISH_TIMEOUT_S`; after an
  error `ERROR_FINISH_TIMEOUT_S`), so a host that never comes cannot hang the others; a
  bug's traceback is printed before that wait. Programs that run on all processes start
  together too (`distributed.StartTogether`).
Exit status: 0 done, `error_status` (1, or what the command documents) for bad input.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback

import jax
from absl import app, flags

from fcdm_jax import distributed

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError,
               ImportError)   # an optional dependency the command needs (its message says which)

_VERBOSE = flags.DEFINE_bool("verbose_errors", False, "On an error, also print its traceback.")


def one_line(error: BaseException | str) -> str:
  """An error's message on one line (messages of other libraries span several)."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":   # a repr'd message
    text = text[1:-1]
  return " ".join(text.split()) or type(error).__name__


def _closest_flag(name: str) -> str | None:
  close = difflib.get_close_matches(name, list(flags.FLAGS), n=1, cutoff=0.75)
  return close[0] if close else None


def _unknown_config_field(argv: list[str], error: BaseException) -> str | None:
  """'--config.a.b: b is not a field of config.a (did you mean ...?); it has: ...' for an
  override naming a field the config lacks (ml_collections raises KeyError/AttributeError)."""
  key = one_line(error).split(" ")[0].strip("'\"")
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=")[0]
    parts = name.split(".")
    if len(parts) < 2 or key not in parts[1:]:
      continue
    where = parts[:parts.index(key, 1)]
    try:
      node = flags.FLAGS[where[0]].value
      if node is None:   # parsing stopped before the flag took its value: load the file
        given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{where[0]}=")]
        node = flags.FLAGS[where[0]].parser.parse(given[-1])
      for part in where[1:]:
        node = node[part]
      fields = sorted(node.keys())
    except Exception:   # the config itself does not load: say what we know
      return f"--{name}: the config has no field {key!r}"
    close = difflib.get_close_matches(key, fields, n=1)
    return (f"--{name}: {'.'.join(where)} has no field {key!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; its fields: {', '.join(fields)}")
  return None


def parse_flags(argv: list[str], error_status: int = 1) -> list[str]:
  """absl's flag parsing; a bad command line exits with one `error:` line."""
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    hint = _closest_flag(e.flagname)
    message = (_unknown_config_field(argv, KeyError(e.flagname.split(".")[-1]))
               if "." in e.flagname else None) or (
        f"unknown flag --{e.flagname}" + (f" (did you mean --{hint}?)" if hint else ""))
  except (AttributeError, KeyError) as e:   # ml_collections: an override of no field
    message = _unknown_config_field(argv, e) or f"bad command line: {one_line(e)}"
  except (flags.Error, TypeError, ValueError, OSError,
          SyntaxError) as e:   # ml_collections raises several kinds for a bad --config
    required = re.search(r"Flag --(\w+) must have a value other than None", str(e))
    message = (f"--{required.group(1)} is required" if required
               else f"bad command line: {one_line(e)}")
  print(f"error: {message}; see --help", file=sys.stderr)
  sys.exit(error_status)


def config_value(holder):
  """The config of a `config_flags` flag; a file that is missing or fails to load is a
  ValueError naming it (ml_collections loads it at first use and raises OSError)."""
  try:
    config = holder.value
    if config is not None:
      getattr(config, "keys")   # a config that failed to load raises here
    return config
  except OSError as e:
    raise ValueError(f"--config: {one_line(e)}") from e


def config_file(holder) -> str:
  """The file a `config_flags` flag loads, without its argument (`FILE.py:flow`)."""
  name = flags.FLAGS[holder.name].config_filename or ""
  return name if "://" in name else name.split(":", 1)[0]


# How long a finished process waits at the end for the others: a slow host's evaluation or
# final checkpoint may take long; after a user error every host fails at the same check.
FINISH_TIMEOUT_S = 6 * 3600
ERROR_FINISH_TIMEOUT_S = 300


def finish(status: int, timeout_s: float = FINISH_TIMEOUT_S) -> None:
  """The agreed end of a multi-process run (a no-op in one process): a barrier every process
  reaches, then `jax.distributed.shutdown()`. If the others do not come within `timeout_s`,
  the process exits with `status` at once: JAX's exit-time shutdown would wait for them
  and then abort."""
  if not jax.distributed.is_initialized():
    return
  if distributed.meet("fcdm_jax_exit", timeout_s):
    jax.distributed.shutdown()
    return
  print(f"warning: the other processes did not reach the end within {timeout_s:.0f} s; "
        "exiting without the agreed shutdown", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def define_distributed_flag() -> None:
  """`--distributed` for a command that can run on several processes: `run` then starts
  `jax.distributed` before `main` (also without the flag when the environment names a
  cluster, see `distributed.maybe_initialize`)."""
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (also done when "
                    "JAX_COORDINATOR_ADDRESS or a multi-task SLURM job is present).")


def run(main, error_status: int = 1) -> None:
  """Runs `main(argv)` as a command (see the module docstring)."""

  def command(argv):
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}: every input is a flag, --name=value; "
            "see --help", file=sys.stderr, flush=True)
      sys.exit(error_status)
    try:
      if "distributed" in flags.FLAGS:
        distributed.maybe_initialize(flags.FLAGS.distributed)
      status = main(argv)
    except app.UsageError:
      raise
    except USER_ERRORS as e:
      if _VERBOSE.value:
        traceback.print_exc()
      print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
      finish(error_status, ERROR_FINISH_TIMEOUT_S)
      sys.exit(error_status)
    except SystemExit as e:   # a command's own exit status (e.g. preflight's DOES NOT FIT)
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
      finish(code, FINISH_TIMEOUT_S if code == 0 else ERROR_FINISH_TIMEOUT_S)
      raise
    except Exception:   # a bug: its traceback first, then the same agreed end
      traceback.print_exc()
      sys.stderr.flush()
      finish(1, ERROR_FINISH_TIMEOUT_S)
      sys.exit(1)
    finish(status or 0)
    return status

  app.run(command, flags_parser=lambda argv: parse_flags(argv, error_status))
