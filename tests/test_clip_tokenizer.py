"""Our CLIP tokenizer against transformers' CLIPTokenizer on a small BPE vocabulary learned
here (no download): the same ids, truncation and padding, and clear errors."""


import numpy as np
import pytest

from fcdm_jax.models import clip_tokenizer as ct

from helpers.model_files import CORPUS, learn_bpe, write_folder
from helpers.torch_compat import import_torchvision

PROMPTS = [
    "a photo of a cat", "A PHOTO   of\ta\n\ncat!!  ", "Hello, World... (really?) #1 @home",
    "café crème brûlée", "Cafe\u0301 na\u0308ive", "東京の夜景 tokyo", "中文 한국어 日本語",
    "🐱🐶 emoji 👩‍👩‍👧 cats ❤️", "it's a dog's life, isn't it? THEY'RE", "1234567 numbers 3.14 v2",
    "", "   ", "a <|endoftext|> b", "x<|startoftext|>y", "a <|EndOfText|> b",
    "ΟΔΟΣ Σίσυφος", "İstanbul ǅ straße ﬁ", "nbsp\u00a0ideo\u3000ls\u2028fs\x1cnel\x85zw\u200bx",
    "Ω≈ç√∫˜µ≤≥÷ – — “quotes” ‘single’", "wow!! great! !!!",
    " ".join(["photograph"] * 100),            # far longer than 77 tokens: truncated
    "an astronaut riding a horse " * 12,
]


@pytest.fixture(scope="module")
def hf_tokenizer():
  import_torchvision()   # transformers imports torchvision when it is installed
  return pytest.importorskip("transformers").CLIPTokenizer


@pytest.fixture(scope="module")
def merges():
  return learn_bpe(CORPUS, 300)


def assert_same_ids(hf_cls, folder, prompts=PROMPTS):
  ours = ct.load_clip_tokenizer(str(folder))
  hf = hf_cls.from_pretrained(str(folder))
  want = hf(prompts, padding="max_length", max_length=77, truncation=True,
            return_tensors="np")["input_ids"]
  got = ours(prompts)
  assert got.dtype == np.int32 and got.shape == (len(prompts), 77)
  for prompt, g, w in zip(prompts, got, want):
    assert g.tolist() == w.tolist(), prompt
  return ours, got


def test_openai_layout_matches_transformers(hf_tokenizer, merges, tmp_path):
  assert len(merges) > 100   # every pair of the corpus merged: whole words are tokens
  ours, ids = assert_same_ids(hf_tokenizer, write_folder(tmp_path / "tok", merges))
  eos = ours.eos_id
  assert ours.pad_id == eos                                   # OpenAI pads with end-of-text
  assert ids[0, 0] == ours.bos_id and ids[0, -1] == eos
  long_row = ids[PROMPTS.index(" ".join(["photograph"] * 100))]
  assert long_row[0] == ours.bos_id and long_row[76] == eos and eos not in long_row[1:76]
  assert ids[PROMPTS.index("")].tolist() == [ours.bos_id] + [eos] * 76


def test_pad_token_and_padding_side_from_the_folder(hf_tokenizer, merges, tmp_path):
  # Stable Diffusion 2's (OpenCLIP) tokenizer pads with "!"; a special token is matched
  # whole in the raw text, so "!!" is two tokens there.
  ours, ids = assert_same_ids(hf_tokenizer, write_folder(tmp_path / "bang", merges,
                                                         pad_token="!"))
  assert ours.pad_id == ours.vocab["!"] != ours.eos_id
  row = ids[PROMPTS.index("a photo of a cat")].tolist()
  assert row[row.index(ours.eos_id) + 1:] == [ours.pad_id] * (76 - row.index(ours.eos_id))
  ours, ids = assert_same_ids(hf_tokenizer, write_folder(tmp_path / "left", merges,
                                                         padding_side="left"))
  assert ids[PROMPTS.index("a photo of a cat"), -1] == ours.eos_id


def test_symbols_missing_from_the_vocabulary_are_unknown(hf_tokenizer, merges, tmp_path):
  # Without the end-of-word forms of UTF-8 continuation bytes, every word ending in a
  # non-ASCII character holds an unknown symbol.
  symbols = ct.byte_symbols()
  drop = {symbols[b] + "</w>" for b in range(0x80, 0xC0)}
  known, kept = (set(symbols) | {s + "</w>" for s in symbols}) - drop, []
  for left, right in merges:      # the merges still built from known symbols
    if left in known and right in known:
      kept.append((left, right))
      known.add(left + right)
  assert len(kept) < len(merges)
  folder = write_folder(tmp_path / "unk", kept, drop=drop)
  ours, ids = assert_same_ids(hf_tokenizer, folder, ["café crème", "東京", "plain"])
  assert ours.unk_id in ids[0] and ours.unk_id not in ids[2, 1:4]


def test_pipeline_subfolder_and_context_length(merges, tmp_path):
  write_folder(tmp_path / "tokenizer", merges)
  tok = ct.load_clip_tokenizer(str(tmp_path), context_length=8)   # finds tokenizer/
  ids = tok(" ".join(["photograph"] * 20))
  assert ids.shape == (1, 8) and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  assert tok.encode("a cat") == tok(["a cat"])[0, 1:-1][:len(tok.encode("a cat"))].tolist()


def test_errors(merges, tmp_path):
  with pytest.raises(FileNotFoundError, match="CLIP tokenizer folder not found"):
    ct.load_clip_tokenizer(str(tmp_path / "nowhere"))
  folder = write_folder(tmp_path / "tok", merges)
  (folder / "merges.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"lacks merges.txt"):
    ct.load_clip_tokenizer(str(folder))
  folder = write_folder(tmp_path / "pad", merges, pad_token="<pad>")
  with pytest.raises(ValueError, match=r"special tokens \{'pad_token': '<pad>'\} are not in "
                                       "the vocabulary"):
    ct.load_clip_tokenizer(str(folder))
  folder = write_folder(tmp_path / "bad", merges)
  (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(ValueError, match="merges.txt line 2: expected two"):
    ct.load_clip_tokenizer(str(folder))
  tok = ct.load_clip_tokenizer(str(write_folder(tmp_path / "ok", merges)))
  with pytest.raises(TypeError, match="prompts must be strings"):
    tok(["a cat", None])
