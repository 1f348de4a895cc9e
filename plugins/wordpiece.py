"""BERT's uncased WordPiece tokenizer, in plain Python.

It splits text the way ``BertTokenizer(do_lower_case=True)`` does: lower-case, strip
accents, split on whitespace and punctuation (each CJK character is a word of its own),
then cut each word into the longest vocabulary pieces from the left, continuation pieces
prefixed ``##``. A word that cannot be cut, or one over 100 characters, is ``[UNK]``.

Written here instead of depending on ``tokenizers``: the static embeddings need only this,
and it is 60 lines. A :class:`WordPiece` keeps a per-word cache that grows with the
vocabulary of the texts seen; it is safe to share between threads (a cache race only
recomputes a word).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

__all__ = ["WordPiece"]

_MAX_WORD = 100


def _is_punctuation(char: str) -> bool:
    # BERT counts every non-alphanumeric ASCII character as punctuation ("$", "^", "`").
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


class WordPiece:
    """Tokenizer over ``vocab`` (one piece per line, the line number is its id)."""

    def __init__(self, vocab: Iterable[str]) -> None:
        self.vocab: dict[str, int] = {}
        for index, piece in enumerate(vocab):
            self.vocab.setdefault(piece, index)
        self.unk = self.vocab["[UNK]"]
        self.cls = self.vocab.get("[CLS]", self.unk)
        self.sep = self.vocab.get("[SEP]", self.unk)
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_text(cls, vocab: str) -> WordPiece:
        """From a ``vocab.txt``'s content. Only "\\n" ends a line: BERT's vocabulary holds
        characters that ``str.splitlines`` would also split at."""
        lines = vocab.split("\n")
        return cls(lines[:-1] if lines and not lines[-1] else lines)

    def words(self, text: str) -> list[str]:
        """The lower-cased, accent-stripped words and punctuation marks of ``text``."""
        text = unicodedata.normalize("NFD", text.lower())
        words: list[str] = []
        current: list[str] = []
        for char in text:
            category = unicodedata.category(char)
            if category == "Mn":  # a combining accent: dropped
                continue
            if char.isspace() or category in ("Cc", "Cf", "Cs", "Co", "Cn"):
                if current:
                    words.append("".join(current))
                    current = []
            elif _is_punctuation(char) or _is_cjk(ord(char)):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(char)
            else:
                current.append(char)
        if current:
            words.append("".join(current))
        return words

    def pieces(self, word: str) -> tuple[int, ...]:
        """The ids of ``word``'s pieces, greedy longest match first; ``(unk,)`` if none fits."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        start = 0
        while start < len(word) and len(word) <= _MAX_WORD:
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                break
            ids.append(found)
            start = end
        result = tuple(ids) if ids and start == len(word) else (self.unk,)
        self._cache[word] = result
        return result

    def ids(self, text: str) -> list[int]:
        """The piece ids of ``text``, without ``[CLS]`` and ``[SEP]``."""
        return [index for word in self.words(text) for index in self.pieces(word)]

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        """``[CLS] pieces [SEP]``, the pieces cut to fit ``max_length``."""
        return [self.cls, *self.ids(text)[: max(0, max_length - 2)], self.sep]
