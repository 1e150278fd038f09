"""JAX's persistent compilation cache for training, previews and sampling.

A restart after a preemption would otherwise recompile the train step and the samplers
(minutes for XL on a pod). The cache lives in the run's workdir by default, so every host
of a pod and every fresh VM after a preemption finds it (`gs://` works: JAX writes it
through etils.epath). Settings (`config.compilation_cache_dir`):
  'auto' ... JAX_COMPILATION_CACHE_DIR / jax's config if the user set one, else
             `<workdir>/xla_cache`
  ''     ... off
  a path ... that directory
`CacheStats` counts hits and the compile seconds they saved, for the log.
"""

from __future__ import annotations

import os
import threading

import jax
from absl import logging
from etils import epath

DEFAULT_SUBDIR = "xla_cache"
_HITS = "/jax/compilation_cache/cache_hits"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def resolve(setting: str, workdir: str | None) -> str | None:
  """The directory the setting names, or None for off."""
  if setting is None or str(setting).lower() in ("", "off", "none", "false"):
    return None
  if setting != "auto":
    return str(setting)
  already = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if already:
    return already
  if not workdir:
    return None
  return str(epath.Path(workdir) / DEFAULT_SUBDIR)


def enable(setting: str, workdir: str | None) -> str | None:
  """Points JAX's persistent cache at `resolve(setting, workdir)`; returns it (None: off).

  Call before the first compilation. Programs that compile in under a second are not
  worth a file and stay out (JAX's default threshold).
  """
  directory = resolve(setting, workdir)
  if directory is None:
    if setting != "auto":  # explicitly off, even if the environment names a cache
      jax.config.update("jax_enable_compilation_cache", False)
    return None
  if directory != jax.config.jax_compilation_cache_dir:
    if not directory.startswith(("gs://", "/")) and "://" not in directory:
      directory = os.path.abspath(directory)
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_enable_compilation_cache", True)
  logging.info("persistent compilation cache: %s", directory)
  return directory


class CacheStats:
  """Counts persistent-cache hits and the compile seconds they saved, process-wide."""

  _lock = threading.Lock()
  _hits = 0
  _saved = 0.0
  _registered = False

  @classmethod
  def install(cls) -> None:
    with cls._lock:
      if cls._registered:
        return
      cls._registered = True

    def on_event(event, **kwargs):
      if event == _HITS:
        with cls._lock:
          cls._hits += 1

    def on_duration(event, seconds, **kwargs):
      if event == _SAVED:
        with cls._lock:
          cls._saved += float(seconds)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)

  @classmethod
  def snapshot(cls) -> tuple[int, float]:
    with cls._lock:
      return cls._hits, cls._saved
