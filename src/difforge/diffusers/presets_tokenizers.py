"""Offline stand-ins for the CLIP and T5 tokenizers.

The real tokenizer files (CLIP's 49k BPE merges, T5's SentencePiece model) live on the Hub
and cannot be fetched here. These builders create tokenizers of the same transformers classes
in memory, with tiny vocabularies, so ``pipe(prompt="a cat")`` runs end to end:

* CLIP: byte-level BPE with no merges, so every UTF-8 byte is one token (a word's last byte
  carries CLIP's ``</w>`` suffix). The start/end-of-text tokens get the two largest ids, as in
  the real vocabulary; CLIP text models with the legacy ``eos_token_id == 2`` pool at
  ``argmax(input_ids)`` and thus still pool at the end-of-text token.
* T5: a Unigram model over single ASCII characters (plus their word-initial ``▁`` forms),
  with T5's fixed ids ``<pad>=0, </s>=1, <unk>=2``.

Token ids mean nothing to randomly initialised encoders; what matters is that shapes,
padding, truncation, attention masks and special tokens behave like the real ones.
"""

from __future__ import annotations

import string

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_VOCAB_SIZE = 514
"""Size of the offline CLIP vocabulary: 256 bytes, 256 word-final bytes, bos, eos."""

T5_VOCAB_SIZE = 4 + 2 * (len(string.ascii_letters) + len(string.digits) + len(string.punctuation))
"""Size of the offline T5 vocabulary: 3 special tokens, ``▁`` and two forms of each char."""


def make_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A working ``CLIPTokenizer`` with a byte-level vocabulary, built without files."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == CLIP_VOCAB_SIZE
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A working ``T5Tokenizer`` with a character-level Unigram vocabulary, built without
    files. Characters outside printable ASCII map to ``<unk>``."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        # Equal scores: Unigram then prefers the segmentation with the fewest pieces, which
        # glues the word-boundary marker to the first character, as SentencePiece does.
        pieces += [("▁" + ch, -1.0), (ch, -1.0)]
    assert len(pieces) == T5_VOCAB_SIZE
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
