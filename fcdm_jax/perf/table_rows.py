"""What the preflight tables of docs/performance.md share: rows kept in a JSON file as they
finish, each compiled by a preflight in its own process, and a markdown section rewritten
between marker comments.

A row is saved as soon as its preflight ends (`save`: merged under a lock with what other
sittings wrote meanwhile, written to a temporary file and renamed), so an interrupted table
loses one row at most and a rerun goes on from the rows already there.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import threading
import time
from concurrent import futures
from typing import Any, Callable

from fcdm_jax import fileio

Row = dict[str, Any]


def save(path: pathlib.Path, results: dict[str, Row], key: str,
         load: Callable[[pathlib.Path], dict[str, Row]]) -> None:
  """Adds row `key` of `results` to the file, merged under a lock with the rows `load`
  reads from it now; `results` gains those rows too."""
  with fileio.local_lock(path.with_suffix(".json.lock")):
    merged = load(path)
    merged[key] = results[key]
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
  results.update(merged)


def write_section(doc: pathlib.Path, table: str, start: str, end: str, title: str) -> None:
  """Replaces the text between the markers `start` and `end` (which `table` begins and ends
  with) by `table`; appends it under a `## title` heading where the doc has no markers."""
  text = doc.read_text() if doc.exists() else ""
  if start in text and end in text:
    head, rest = text.split(start, 1)
    text = head + table + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + f"\n\n## {title}\n\n" + table + "\n"
  tmp = doc.with_suffix(f".md.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, doc)


def run_preflight(e: Row, command: Callable[[Row, str], list[str]],
                  summarize: Callable[[Row, dict[str, Any]], Row], timeout_s: int,
                  log: Callable[[str], None]) -> Row:
  """Runs the preflight `command(e, json_path)` and returns `summarize(e, its report)`, or
  `e` with an `error` (the last lines it printed) when it wrote no report. Exit status 1
  (does not fit) still has a report. What the preflight prints goes to `log` as it comes
  (a row can take many minutes), prefixed with the row's key."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    t0 = time.time()
    with open(os.path.join(tmp, "stderr"), "w+") as err:
      proc = subprocess.Popen(command(e, out), stdout=subprocess.PIPE, stderr=err, text=True)
      timer = threading.Timer(timeout_s, proc.kill)
      timer.start()
      printed = []
      try:
        for line in proc.stdout:
          printed.append(line.rstrip())
          log(f"  [{e['key']}] {line.rstrip()}")
        returncode = proc.wait()
      finally:
        timed_out = not timer.is_alive()
        timer.cancel()
      err.seek(0)
      stderr = err.read()
    if timed_out:
      return dict(e, error=f"timed out after {timeout_s} s", date=time.strftime("%Y-%m-%d"))
    if returncode in (0, 1) and os.path.exists(out):
      with open(out) as f:
        return summarize(e, json.load(f))
    tail = (stderr.strip() or "\n".join(printed)).splitlines()[-3:]
    log(f"  failed after {time.time() - t0:.0f} s: {' | '.join(tail)}")
    return dict(e, error=f"exit {returncode}: {' | '.join(tail)[:500]}",
                date=time.strftime("%Y-%m-%d"))


def run_all(todo: list[Row], run_entry: Callable[[Row], Row],
            on_done: Callable[[Row, Row, float], None], jobs: int,
            log: Callable[[str], None]) -> None:
  """Runs `run_entry` for the rows of `todo`, `jobs` at a time (each row a process of its
  own), and hands each result to `on_done(entry, row, seconds)` in this thread alone, so
  saving a row never races another."""
  def one(e):
    log(f"{time.strftime('%H:%M:%S')} {e['key']}: compiling ...")
    t0 = time.time()
    return run_entry(e), time.time() - t0

  with futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    pending = {pool.submit(one, e): e for e in todo}
    for fut in futures.as_completed(pending):
      row, seconds = fut.result()
      on_done(pending[fut], row, seconds)


def pending(entries: list[Row], results: dict[str, Row], *, only: str = "", skip: str = "",
            retry_errors: bool = False, max_entries: int = 0,
            stale: Callable[[Row], bool] | None = None) -> list[Row]:
  """The entries to compile: those without a row (or with a failed one, when
  `retry_errors`, or one `stale` says was made with settings since changed), whose key
  contains `only` and not `skip`, at most `max_entries` (> 0)."""
  todo = [e for e in entries
          if only in e["key"] and not (skip and skip in e["key"])
          and (results.get(e["key"]) is None
               or (retry_errors and "error" in results[e["key"]])
               or (stale is not None and stale(results[e["key"]])))]
  return todo[:max_entries] if max_entries else todo


def gib(v) -> str:
  return "-" if v is None else f"{v / 2**30:.1f}"


def label(config_file: str) -> str:
  """configs/xl_512.py -> XL/512."""
  return pathlib.Path(config_file).stem.upper().replace("_", "/")
