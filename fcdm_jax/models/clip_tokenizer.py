"""CLIP's byte-level BPE tokenizer in pure Python, read from a local Hugging Face folder.

Why our own: the text encoder must see the ids it was trained on, and the tokenizer is
small enough to own rather than to pull transformers into the package. It gives the ids of
transformers' `CLIPTokenizer` called as Stable Diffusion calls it (`padding="max_length",
max_length=77, truncation=True`), which cleans text without ftfy: Unicode NFC, every run of
white space becomes one space, lower case (character by character). Then CLIP's pattern
splits words, contractions, single digits and runs of other symbols; each piece is UTF-8
bytes mapped to printable characters, its last character marked `</w>`, and merged pair
by pair in `merges.txt` order (a symbol missing from the vocabulary is the unknown token).
Special tokens spelled out in a caption are matched first, exactly as spelled. A row is `<|startoftext|>`, at most 75 tokens (longer
captions are cut), `<|endoftext|>`, then the pad token up to 77 (on the side the folder's
`tokenizer_config.json` names, right by default).

    tokenizer = load_clip_tokenizer("/path/to/clip-vit-large-patch14")
    ids = tokenizer(["a photo of a cat", ""])    # int32 (2, 77)
"""

from __future__ import annotations

import functools
import json
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np
import regex

from fcdm_jax import fileio
from fcdm_jax.models.torch_weights import model_folder, read_config

VOCAB_NAME = "vocab.json"
MERGES_NAME = "merges.txt"
CONFIG_NAMES = ("tokenizer_config.json", "special_tokens_map.json")  # the later one wins
PIPELINE_SUBFOLDER = "tokenizer"
CONTEXT_LENGTH = 77
END_OF_WORD = "</w>"
# transformers' CLIPTokenizer defaults (OpenAI CLIP pads with end-of-text).
DEFAULT_TOKENS = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                      pad_token="<|endoftext|>", unk_token="<|endoftext|>")
PADDING_SIDES = ("right", "left")

WHITESPACE = regex.compile(r"\s+")
# CLIP's split: words, contractions, single digits, runs of other symbols.
PIECES = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                       r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
# transformers then splits each piece again with GPT-2's byte-level pattern (white space
# is gone by then); it changes only pieces that mix letters and symbols, which CLIP's split
# leaves only for the spelled-out `<|startoftext|>` / `<|endoftext|>` alternatives.
BYTE_LEVEL_PIECES = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+")


@functools.lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
  """The printable character standing for each byte value (GPT-2's byte-level alphabet).

  Bytes that are visible Latin-1 characters stand for themselves; the others (controls,
  space, soft hyphen ...) take the characters from U+0100 on, in byte order.
  """
  visible = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
      set(range(ord("®"), ord("ÿ") + 1))
  symbols, spare = [], 256
  for b in range(256):
    if b in visible:
      symbols.append(chr(b))
    else:
      symbols.append(chr(spare))
      spare += 1
  return tuple(symbols)


def clean(text: str) -> str:
  """What transformers' CLIPTokenizer normalises (no ftfy): NFC, white space runs -> ' ',
  lower case per character (no context-dependent rules such as the Greek final sigma)."""
  text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
  return "".join(c.lower() for c in text)


class CLIPTokenizer:
  """`tokenizer(prompts)` -> int32 (N, context_length) ids; `encode(text)` -> the ids of one
  text without start/end tokens, truncation or padding."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               context_length: int = CONTEXT_LENGTH, padding_side: str = "right",
               bos_token: str = DEFAULT_TOKENS["bos_token"],
               eos_token: str = DEFAULT_TOKENS["eos_token"],
               pad_token: str = DEFAULT_TOKENS["pad_token"],
               unk_token: str = DEFAULT_TOKENS["unk_token"]):
    if context_length < 2:
      raise ValueError(f"context_length {context_length} leaves no room for the start and "
                       "end tokens")
    if padding_side not in PADDING_SIDES:
      raise ValueError(f"padding_side {padding_side!r}: expected one of {PADDING_SIDES}")
    self.vocab = dict(vocab)
    tokens = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                  unk_token=unk_token)
    missing = {k: v for k, v in tokens.items() if v not in self.vocab}
    if missing:
      raise ValueError(f"special tokens {missing} are not in the vocabulary")
    self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
    self.pad_id, self.unk_id = self.vocab[pad_token], self.vocab[unk_token]
    # transformers matches special tokens in the raw text first, exactly as spelled.
    self.special = {t: self.vocab[t] for t in tokens.values()}
    longest_first = sorted(self.special, key=len, reverse=True)
    self._special_split = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")")
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self.context_length = context_length
    self.padding_side = padding_side
    self._bpe = functools.lru_cache(maxsize=65536)(self._merge)

  def _merge(self, piece: str) -> tuple[str, ...]:
    """BPE of one piece (already in byte symbols): the lowest-ranked adjacent pair is merged,
    everywhere it occurs from the left, until no adjacent pair is in the merges."""
    word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
    while len(word) > 1:
      ranked = [(self.ranks[p], p) for p in zip(word, word[1:]) if p in self.ranks]
      if not ranked:
        break
      first, second = min(ranked)[1]
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return tuple(word)

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"prompts must be strings, got {type(text).__name__}: {text!r}")
    symbols = byte_symbols()
    ids = []
    for i, part in enumerate(self._special_split.split(text)):
      if i % 2:  # a special token (split() returns text, token, text, ...)
        ids.append(self.special[part])
        continue
      for word in PIECES.findall(clean(part)):
        for piece in BYTE_LEVEL_PIECES.findall(word):
          piece = "".join(symbols[b] for b in piece.encode("utf-8"))
          ids.extend(self.vocab.get(token, self.unk_id) for token in self._bpe(piece))
    return ids

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    rows = np.full((len(prompts), self.context_length), self.pad_id, np.int32)
    for r, text in enumerate(prompts):
      ids = [self.bos_id] + self.encode(text)[:self.context_length - 2] + [self.eos_id]
      if self.padding_side == "right":
        rows[r, :len(ids)] = ids
      else:
        rows[r, self.context_length - len(ids):] = ids
    return rows


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer configs write it: a string or {"content": ...}."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def read_merges(path: str) -> list[tuple[str, str]]:
  """`merges.txt`: an optional `#version` line, then one `left right` pair a line."""
  merges = []
  for number, line in enumerate(fileio.read_text(path).split("\n"), start=1):
    line = line.rstrip("\r\n")
    if (number == 1 and line.startswith("#version")) or not line:
      continue
    pair = line.split(" ")
    if len(pair) != 2:
      raise ValueError(f"{path} line {number}: expected two space-separated symbols, got "
                       f"{line!r}")
    merges.append((pair[0], pair[1]))
  return merges


def find_tokenizer_folder(path: str) -> str:
  """The folder holding vocab.json and merges.txt: `path` itself or a pipeline's `tokenizer/`."""
  path = model_folder(path, "CLIP tokenizer folder", VOCAB_NAME, MERGES_NAME, PIPELINE_SUBFOLDER)
  missing = [n for n in (VOCAB_NAME, MERGES_NAME) if not fileio.isfile(fileio.join(path, n))]
  if missing:
    raise FileNotFoundError(f"{path} lacks {' and '.join(missing)}: the CLIP tokenizer reads "
                            f"{VOCAB_NAME} and {MERGES_NAME} (a folder saved by transformers 5 "
                            "may hold only tokenizer.json; copy the two files from the model's "
                            "original folder)")
  return path


def load_clip_tokenizer(path: str, context_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
  """The tokenizer of a local transformers CLIP folder: vocab.json, merges.txt, and the
  special tokens and padding side of tokenizer_config.json / special_tokens_map.json."""
  path = find_tokenizer_folder(path)
  vocab_path = fileio.join(path, VOCAB_NAME)
  vocab = read_config(vocab_path, "vocabulary (token -> id)")
  settings: dict[str, Any] = dict(DEFAULT_TOKENS, padding_side="right")
  for name in CONFIG_NAMES:
    config_path = fileio.join(path, name)
    if not fileio.isfile(config_path):
      continue
    try:
      config = json.loads(fileio.read_text(config_path))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{config_path} is not readable JSON: {e}") from e
    for key in DEFAULT_TOKENS:
      if _token_text(config.get(key)) is not None:
        settings[key] = _token_text(config[key])
    if isinstance(config.get("padding_side"), str):
      settings["padding_side"] = config["padding_side"]
  try:
    return CLIPTokenizer(vocab, read_merges(fileio.join(path, MERGES_NAME)),
                         context_length=context_length, **settings)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# ------------------------------------------------------------- making a small vocabulary


def learn_merges(corpus: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
  """BPE merges learned from `corpus`: the most frequent adjacent pair of its words (split
  and cleaned as the tokenizer splits them), merged in turn, at most `num_merges` times.
  For small text encoders trained here (the colour-digit demo) and for tests."""
  import collections
  symbols = byte_symbols()
  words: collections.Counter = collections.Counter()
  for line in corpus:
    for word in PIECES.findall(clean(line)):
      chars = "".join(symbols[b] for b in word.encode("utf-8"))
      words[tuple(chars[:-1]) + (chars[-1] + END_OF_WORD,)] += 1
  merges: list[tuple[str, str]] = []
  for _ in range(num_merges):
    pairs: collections.Counter = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged: collections.Counter = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if word[i:i + 2] == best:
          out.append(best[0] + best[1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def write_tokenizer_folder(path: str, merges: Sequence[tuple[str, str]], drop=(),
                           **settings) -> dict[str, int]:
  """Writes a transformers `CLIPTokenizer` folder (OpenAI's vocabulary layout: the 256 byte
  symbols, the same with `</w>`, one token per merge, then the start and end tokens) to
  `path`; `drop` leaves tokens out, `settings` override tokenizer_config.json. Returns the
  vocabulary."""
  symbols = byte_symbols()
  tokens = list(symbols) + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
  tokens = [t for t in tokens if t not in drop] + ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
  config = dict(DEFAULT_TOKENS, model_max_length=CONTEXT_LENGTH)
  config.update(settings)
  special = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False} for k, v in config.items() if k.endswith("_token")}
  fileio.makedirs(path)
  fileio.atomic_write_bytes(fileio.join(path, VOCAB_NAME), json.dumps(vocab).encode())
  fileio.atomic_write_bytes(
      fileio.join(path, MERGES_NAME),
      ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"))
  fileio.atomic_write_bytes(fileio.join(path, CONFIG_NAMES[0]), json.dumps(config).encode())
  fileio.atomic_write_bytes(fileio.join(path, CONFIG_NAMES[1]), json.dumps(special).encode())
  return vocab
