"""Build a CLIP tokenizer for a small, closed vocabulary without downloading anything.

Stable Diffusion pipelines expect a ``CLIPTokenizer`` (byte-pair encoding with a ``vocab.json`` and a
``merges.txt``). Our bundled model and the tests' tiny pipelines need one for a handful of words, and no
model hub is reachable on our machines, so we write the two files ourselves.

How it works: the vocabulary holds every lowercase letter and digit (with and without the end-of-word
marker ``</w>``), so any text still tokenizes, and each listed word becomes one token. BPE applies merges
in rank order, so a merge list written naively for one word can split another (``"r e"`` from *red* fires
inside *squares* before the merges of *squares* do). We therefore simulate BPE on each word with the
merges so far and append the merge of its first two pieces until the word is a single piece; appended
merges have the lowest priority, so earlier words are never broken.
"""

from __future__ import annotations

import itertools
import json
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Run byte-pair encoding on one word's pieces with the given merge ranks (lower merges first)."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        ranked = [(rank, i) for rank, i in pairs if rank is not None]
        if not ranked:
            break
        _, i = min(ranked)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def word_level_bpe(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return a CLIP-style ``(vocab, merges)`` in which each word of ``words`` is a single token.

    Args:
        words: Lowercase words without spaces (duplicates are ignored).

    Returns:
        The token-to-id vocabulary and the ordered merge list.

    >>> vocab, merges = word_level_bpe(["red", "squares"])
    >>> "squares</w>" in vocab and "red</w>" in vocab
    True
    """
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + END_OF_WORD, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        if not word or any(c.isspace() or c.isupper() for c in word):
            raise ValueError(f"word_level_bpe takes lowercase words without spaces, got {word!r}")
        while True:
            pieces = _apply_merges(list(word[:-1]) + [word[-1] + END_OF_WORD], ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    return vocab, merges


def build_word_tokenizer(
    words: Iterable[str], save_directory: str | Path | None = None, model_max_length: int = 16
) -> CLIPTokenizer:
    """Build (and optionally save) a ``CLIPTokenizer`` whose vocabulary holds ``words`` as whole tokens.

    Args:
        words: The vocabulary, e.g. every word of every caption.
        save_directory: Where to write the tokenizer (``save_pretrained`` format); a temporary folder if None.
        model_max_length: Sequence length the text encoder sees (prompts are padded/truncated to it).

    Returns:
        The tokenizer, loaded back from the written files.

    >>> tok = build_word_tokenizer(["a", "red", "circle"], model_max_length=6)
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
    """
    vocab, merges = word_level_bpe(words)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=model_max_length,
            pad_token=EOS_TOKEN,
        )
        if save_directory is not None:
            tokenizer.save_pretrained(str(save_directory))
    return tokenizer
