"""The one path layer: every file an entry point reads or writes goes through here, so
local paths and object-store URLs (`gs://bucket/x`, `s3://...`) behave alike.

Paths are `etils.epath.Path` (what orbax and TFDS use): `pathlib` would turn `gs://b/x`
into `gs:/b/x`. Remote paths go through fsspec (`gcsfs` for `gs://`) unless the user sets
`EPATH_USE_TF=1` to use TensorFlow's gfile; either way Google's clients read
`STORAGE_EMULATOR_HOST`, which is how the tests point them at a local emulator.

Atomic writes. Locally: a temporary file beside the target, fsync, rename. On an object
store there is no rename (gcsfs copies and deletes), but one object upload is atomic: the
object appears only when its upload completes. So a remote write goes to a local
temporary file first and is then uploaded as one object; readers see the old object or
the new one, never part of one. Outputs made of many files (latent shards, sample parts)
are complete only when their marker file (a manifest, the final `.npz`) is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from typing import Callable, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]
# The process's umask, read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; `~` expanded for local paths, URLs kept as they are."""
  if isinstance(p, epath.Path):
    return p
  s = os.fspath(p)
  if not s:
    raise ValueError("empty path")
  if "://" in s and not s.startswith(_SCHEMES):
    raise ValueError(f"{s}: unsupported URL scheme (supported: {', '.join(_SCHEMES)} and "
                     "local paths)")
  return epath.Path(s if "://" in s else os.path.expanduser(s))


def is_remote(p: PathLike) -> bool:
  """True for object-store URLs (gs://, s3://, ...), False for local paths."""
  return os.fspath(p).startswith(_SCHEMES)


def join(p: PathLike, *parts: str) -> str:
  """`p / parts` as a string (keeps `gs://`, unlike os.path.join on a pathlib path)."""
  return os.fspath(path(p).joinpath(*parts))


def relative(p: PathLike, root: PathLike) -> str:
  """`p` relative to `root`, '/'-separated (both local, or both URLs)."""
  if not is_remote(p):
    return os.path.relpath(os.fspath(p), os.fspath(root)).replace(os.sep, "/")
  return os.fspath(path(p).relative_to(path(root)))


def absolute(p: PathLike) -> str:
  """An absolute form of `p` (URLs are absolute already)."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(os.path.expanduser(os.fspath(p)))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def size(p: PathLike) -> int:
  """The length of file `p` in bytes (remote: from the store's metadata)."""
  return int(path(p).stat().length)


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Names (not paths) in directory `p`, sorted. On an object store a folder is only a
  name prefix: one that holds nothing lists as empty instead of missing."""
  try:
    return sorted(c.name for c in path(p).iterdir())
  except FileNotFoundError:
    if is_remote(p):
      return []
    raise


def walk(p: PathLike):
  """(folder, subfolder names, file names) of every folder under `p`, top-down, folders in
  `p`'s form (local: os.walk, following links; remote: the store's listing)."""
  if not is_remote(p):
    yield from os.walk(os.fspath(p), followlinks=True)
    return
  for folder, dirs, files in path(p).walk():
    yield os.fspath(folder), list(dirs), list(files)


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def open_read(p: PathLike):
  """A seekable binary file object (remote: read in blocks on demand)."""
  return path(p).open("rb")


def read_ranges(paths: list, starts: list[int], ends: list[int]) -> list[bytes]:
  """The bytes [start, end) of each path. Local files are read with a seek each; remote
  ones in one concurrent batch of range requests (fsspec `cat_ranges`), without the
  read-ahead of a file object: a record or a header costs only its own bytes."""
  if not paths:
    return []
  if not is_remote(paths[0]):
    out, handles = [], {}
    try:
      for p, a, b in zip(paths, starts, ends):
        f = handles.get(p) or handles.setdefault(p, open(os.fspath(p), "rb"))
        f.seek(a)
        out.append(f.read(b - a))
    finally:
      for f in handles.values():
        f.close()
    return out
  import fsspec
  fs, _ = fsspec.core.url_to_fs(os.fspath(paths[0]))
  return fs.cat_ranges([os.fspath(p) for p in paths], list(starts), list(ends))


def remove(p: PathLike) -> None:
  path(p).unlink()


def rmtree(p: PathLike) -> None:
  path(p).rmtree()


def move(src: PathLike, dst: PathLike) -> None:
  """Renames a file or folder. On an object store (no rename, no real folders) each file
  is copied as one object and then deleted, so a file is never half-present at `dst`."""
  s, d = path(src), path(dst)
  if not is_remote(src) and not is_remote(dst):
    d.parent.mkdir(parents=True, exist_ok=True)
    os.replace(os.fspath(s), os.fspath(d))
    return
  if s.is_dir():
    for child in s.iterdir():
      move(child, d / child.name)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
      s.rmtree()
    return
  with s.open("rb") as f_in, d.open("wb") as f_out:
    shutil.copyfileobj(f_in, f_out, 1 << 24)
  s.unlink()


def upload(local: str, p: PathLike) -> None:
  """Copies the local file `local` to `p` as one write (one object on a store)."""
  with open(local, "rb") as src, path(p).open("wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 24)


def atomic_write(p: PathLike, write: Callable[[str], object]) -> None:
  """`write(tmp_path)` into a local temporary file, then put it at `p` atomically.

  Readers see the old file or the new one, never a partial one; on error the old file
  stays and the temporary file is removed. Locally the temporary file sits beside `p`
  and is renamed; for a URL it is uploaded as one object (see the module docstring).
  """
  if is_remote(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fcdm_upload_") as tmp_dir:
      tmp = os.path.join(tmp_dir, target.name)
      write(tmp)
      upload(tmp, target)
    return
  target = os.fspath(p)
  folder = os.path.dirname(os.path.abspath(target))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
  os.close(fd)
  try:
    # mkstemp makes the file private (0600); the result gets the mode a plain open() would
    # give it (the umask's), or the replaced file's own.
    os.chmod(tmp, os.stat(target).st_mode & 0o7777 if os.path.exists(target)
             else 0o666 & ~_UMASK)
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_output(out: PathLike, *, overwrite: bool = False, inputs=(), flag: str = "--out"
                 ) -> None:
  """Refuses, before any work, an output file that would lose data or fail at the end.

  `out` must not be one of the run's `inputs`, must not exist unless `overwrite`, must not
  be a folder, and its folder must take a write (probed with a small file, removed again:
  the same check works on a bucket). Raises ValueError naming `flag` and the path.
  """
  target = absolute(out)
  for given in inputs:
    if given and absolute(given) == target:
      raise ValueError(f"{flag}={out} is also an input of this run; name another file")
  if isdir(out):
    raise ValueError(f"{flag}={out} is a folder; name a file to write")
  if exists(out) and not overwrite:
    raise ValueError(f"{flag}={out} exists; pass --overwrite to replace it, or name "
                     "another file")
  parent = path(target).parent
  probe = join(str(parent), f".{path(target).name}.write_test")
  try:
    parent.mkdir(parents=True, exist_ok=True)
    path(probe).write_bytes(b"ok")
    remove(probe)
  except OSError as e:
    raise ValueError(f"{flag}={out} cannot be written ({type(e).__name__}: {e}); pick a "
                     "writable location") from e


def check_output_folder(out: PathLike, *, inputs=(), flag: str = "--out") -> None:
  """Refuses, before any work, an output folder that cannot be written: one that is one of
  the run's `inputs`, a file, or whose location takes no write (probed with a small file in
  the folder, or in its nearest existing parent when it does not exist yet, removed again;
  nothing is created). An existing folder is allowed: the commands that write folders
  resume their own unfinished output and refuse one made with other settings."""
  if not os.fspath(out):
    raise ValueError(f"{flag} is empty: name the folder to write to")
  target = absolute(out)
  for given in inputs:
    if given and absolute(given).rstrip("/") == target.rstrip("/"):
      raise ValueError(f"{flag}={out} is also an input of this run; name another folder")
  if isfile(out):
    raise ValueError(f"{flag}={out} is a file; name a folder to write to")
  folder = target
  if not is_remote(target):
    while not os.path.exists(folder):   # the nearest existing parent takes the probe
      folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
      raise ValueError(f"{flag}={out} cannot be made: {folder} is a file; pick a writable "
                       "location")
  probe = join(folder, f".{path(target).name}.write_test")
  try:
    path(probe).write_bytes(b"ok")
    remove(probe)
  except OSError as e:
    raise ValueError(f"{flag}={out} cannot be written ({type(e).__name__}: {e}); pick a "
                     "writable location") from e


@contextlib.contextmanager
def local_lock(p: PathLike) -> Iterator[None]:
  """Holds an exclusive lock on the local file `p` (created if missing) for the `with`
  block, across processes (flock): for writers on one machine that merge into one file.
  Object stores have no locks, so a URL is refused."""
  if is_remote(p):
    raise ValueError(f"{p}: a lock file must be on the local file system")
  with open(os.fspath(p), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_bytes(p: PathLike, data: bytes) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  atomic_write(p, write)


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
  """A local filename holding `p`'s bytes: `p` itself when local, else a downloaded copy
  that is removed afterwards (for readers that need a real file: torch, safetensors, PIL)."""
  if not is_remote(p):
    yield os.fspath(p)
    return
  src = path(p)
  with tempfile.TemporaryDirectory(prefix="fcdm_download_") as tmp_dir:
    local = os.path.join(tmp_dir, src.name)
    with src.open("rb") as f, open(local, "wb") as out:
      shutil.copyfileobj(f, out, 1 << 24)
    yield local


def write_png(p: PathLike, image) -> None:
  """A uint8 (H, W, C) image as a PNG, atomically: grey when C is 1, else its first 3 channels."""
  from PIL import Image
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image[..., :3])
  atomic_write(p, lambda tmp: img.save(tmp, format="PNG"))


def sha256_file(p: PathLike) -> str:
  """Hex sha256 of a file, read in 16 MiB chunks (weights files are large)."""
  digest = hashlib.sha256()
  with path(p).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()
