"""An offline CLIP tokenizer: a byte-level BPE ``CLIPTokenizer`` whose merges spell a given word
list (no download). The tiny CLIP text tower (``dop.training.clip_text``) uses it, and so does the
latency bench's CLIP-L-shaped text tower (``dop.bench``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))

def _pieces(word: str) -> list[str]:
    """How CLIP's pre-tokenizer cuts a lower-case ASCII word (letters, digits, other runs):
    ``top_left`` -> ``top``, ``_``, ``left``."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", word.lower())

def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one piece: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2:]]
    return symbols

def clip_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a small CLIP byte-level BPE in which every piece of ``words`` is one token.

    Laid out like OpenAI CLIP's vocabulary: the 256 byte symbols, the same with ``</w>``, the merged
    symbols, then ``<|startoftext|>`` and ``<|endoftext|>`` last (the largest id). Merges are added
    word by word: the piece is first encoded with the merges so far, then its remaining symbols are
    merged left to right by new (lowest-priority) merges, so earlier words keep their encoding."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        for piece in _pieces(word):
            parts = _bpe(list(piece[:-1]) + [piece[-1] + "</w>"], ranks)
            while len(parts) > 1:
                merge = (parts[0], parts[1])
                ranks[merge] = len(merges)
                merges.append(merge)
                parts = [parts[0] + parts[1], *parts[2:]]
                if parts[0] not in known:
                    known.add(parts[0])
                    tokens.append(parts[0])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges

def clip_tokenizer(words: Sequence[str], model_max_length: int = 32) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (byte-level BPE, pad = ``<|endoftext|>``) in which every piece of ``words``
    is one token. Other words still tokenize, byte by byte."""
    vocab, merges = clip_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
