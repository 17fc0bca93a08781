"""CLIP's byte-level BPE tokenizer, over the ``tokenizers`` library, with open_clip's conventions.

A text becomes ``[start-of-text] + BPE(text) + [end-of-text]``, cut to the context length
(the last kept token is then replaced by end-of-text, so every row ends its text with it), and
padded with 0: an ``int32`` array ``[T, C]``.

The text tower reads its feature at ``argmax(ids)``: the end-of-text token must therefore hold
the largest id of every row. It does for CLIP's vocabulary (end-of-text = 49407 = V - 1, padding
= 0); :class:`Tokenizer` checks that the end-of-text id is the largest id of its vocabulary
and refuses a vocabulary where it is not.

The vocabulary comes from a ``tokenizer.json`` (transformers / open_clip hub repos), from a
``vocab.json`` + ``merges.txt`` pair, or from the ``bpe_simple_vocab_16e6.txt.gz`` merges file
of OpenAI's CLIP (bundled in ``clipdecomp/assets``; MIT licence, as shipped by OpenAI's CLIP and by
open_clip), from which the vocabulary is rebuilt the way OpenAI's tokenizer builds it.

Text is cleaned as open_clip cleans it: HTML entities unescaped (twice), whitespace collapsed,
lower-cased; Unicode NFC. (open_clip also runs ``ftfy.fix_text``, which only repairs mojibake.)
"""
from __future__ import annotations

import gzip
import html
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from clipdecomp import assets

__all__ = ["DEFAULT_BPE", "Tokenizer", "default_tokenizer", "find_tokenizer"]

#: the bundled OpenAI CLIP merges file
DEFAULT_BPE = str(assets.path("bpe_simple_vocab_16e6.txt.gz"))
_SOT_NAMES = ("<|startoftext|>", "<start_of_text>")
_EOT_NAMES = ("<|endoftext|>", "<end_of_text>")
#: CLIP's pre-tokenisation: contractions, letter runs, single digits, punctuation runs
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: unescape HTML twice, collapse whitespace, lower-case.

    Examples
    --------
    >>> clean_text("  A &amp;amp; B\\n ")
    'a & b'
    """
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer returning open_clip-style ``int32 [T, C]`` id arrays.

    Parameters
    ----------
    backend : tokenizers.Tokenizer
        The BPE pipeline (normaliser, pre-tokeniser, model). Its post-processor, truncation and
        padding are not used: start / end tokens, truncation and padding are done here.
    context_length : int
        C, the length of every row (77 for every released CLIP).
    sot_id, eot_id : int, optional
        Start / end-of-text ids; looked up by name (``<|startoftext|>``, ``<|endoftext|>``) when
        not given.

    Raises
    ------
    ValueError
        When the special tokens cannot be found, or end-of-text is not the largest id of the
        vocabulary (``argmax`` would then not find it).

    Examples
    --------
    >>> tok = Tokenizer.from_bpe_gz(DEFAULT_BPE)
    >>> ids = tok(["a photo of a cat"])
    >>> ids.shape, ids.dtype, ids[0, :7].tolist()
    ((1, 77), dtype('int32'), [49406, 320, 1125, 539, 320, 2368, 49407])
    """

    def __init__(self, backend, context_length: int = 77, sot_id: int | None = None,
                 eot_id: int | None = None, source: str = "tokenizer"):
        self.backend = backend
        self.source = source
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
        self.context_length = context_length
        self.sot_id = self._special(sot_id, _SOT_NAMES, "start-of-text")
        self.eot_id = self._special(eot_id, _EOT_NAMES, "end-of-text")
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        largest = max(backend.get_vocab(with_added_tokens=True).values())
        if self.eot_id != largest:
            raise ValueError(
                f"{source}: the end-of-text id {self.eot_id} is not the largest id of the "
                f"vocabulary ({largest}); the text tower takes its feature at argmax(ids), "
                "which would then point at the wrong token")

    def _special(self, given: int | None, names: Sequence[str], what: str) -> int:
        if given is not None:
            return int(given)
        for n in names:
            i = self.backend.token_to_id(n)
            if i is not None:
                return int(i)
        raise ValueError(f"{self.source}: no {what} token ({' / '.join(names)}) in the "
                         "vocabulary; not a CLIP tokenizer")

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], context_length: int = 77) -> Tokenizer:
        """Load a ``tokenizer.json`` (the ``tokenizers`` library format).

        Examples
        --------
        >>> tok = Tokenizer.from_file("tokenizer.json")   # doctest: +SKIP
        """
        from tokenizers import Tokenizer as _Backend

        path = os.fspath(path)
        try:
            backend = _Backend.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises bare Exception
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        backend.no_truncation()
        backend.no_padding()
        return cls(backend, context_length, source=path)

    @classmethod
    def from_vocab_merges(cls, vocab: str | os.PathLike[str] | dict[str, int],
                          merges: str | os.PathLike[str] | Sequence[tuple[str, str]],
                          context_length: int = 77) -> Tokenizer:
        """Build the CLIP BPE pipeline from ``vocab.json`` and ``merges.txt`` (or their contents).

        Examples
        --------
        >>> tok = Tokenizer.from_vocab_merges("vocab.json", "merges.txt")   # doctest: +SKIP
        """
        source = "vocab/merges"
        if isinstance(vocab, dict):
            table: dict[str, int] = vocab
        else:
            source = os.fspath(vocab)
            with open(source, "r", encoding="utf-8") as fh:
                table = json.load(fh)
        if isinstance(merges, (str, os.PathLike)):
            with open(os.fspath(merges), "r", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
            pairs = [_merge_pair(m) for m in lines if m.strip() and not m.startswith("#version")]
        else:
            pairs = [_merge_pair(m) if isinstance(m, str) else (str(m[0]), str(m[1]))
                     for m in merges]
        return cls(_clip_backend(table, pairs), context_length, source=source)

    @classmethod
    def from_bpe_gz(cls, path: str | os.PathLike[str] = DEFAULT_BPE,
                    context_length: int = 77) -> Tokenizer:
        """Build the tokenizer from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` merges file.

        The vocabulary is rebuilt as OpenAI's tokenizer builds it: the 256 byte symbols, the same
        with ``</w>``, one entry per merge (48,894 of them), then start- and end-of-text
        (ids 49406 and 49407).

        Examples
        --------
        >>> Tokenizer.from_bpe_gz().vocab_size
        49408
        """
        path = os.fspath(path)
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [_merge_pair(m) for m in lines[1:49152 - 256 - 2 + 1]]
        symbols = list(_bytes_to_unicode().values())
        vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab_list += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {s: i for i, s in enumerate(vocab_list)}
        return cls(_clip_backend(vocab, merges), context_length, source=path)

    # -- use -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start / end tokens.

        Examples
        --------
        >>> default_tokenizer().encode("A photo")
        [320, 1125]
        """
        return list(self.backend.encode(clean_text(text), add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a row of ids; start / end / padding tokens are dropped.

        Examples
        --------
        >>> tok = default_tokenizer()
        >>> tok.decode(tok(["a photo of a cat"])[0])
        'a photo of a cat'
        """
        keep = [int(i) for i in ids if int(i) not in (self.sot_id, self.eot_id, 0)]
        text = self.backend.decode(keep, skip_special_tokens=True)
        return " ".join(text.replace("</w>", " ").split())

    def __call__(self, texts: str | Sequence[str],
                 context_length: int | None = None) -> np.ndarray:
        """Tokenize texts into an ``int32 [T, C]`` array (open_clip's layout).

        Parameters
        ----------
        texts : str or sequence of str
            One text or a list of T texts.
        context_length : int, optional
            C; defaults to the model's (77).

        Returns
        -------
        numpy.ndarray
            ``int32 [T, C]``: start-of-text, tokens, end-of-text, zeros. A text longer than
            C - 2 tokens is cut, and its last kept token replaced by end-of-text.

        Examples
        --------
        >>> default_tokenizer()(["a dog", "a cat"], context_length=8).tolist()
        [[49406, 320, 1929, 49407, 0, 0, 0, 0], [49406, 320, 2368, 49407, 0, 0, 0, 0]]
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
        c = self.context_length if context_length is None else int(context_length)
        if c < 2:
            raise ValueError(f"context_length must be >= 2, got {c}")
        out = np.zeros((len(texts), c), dtype=np.int32)
        encs = self.backend.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        for i, enc in enumerate(encs):
            row = [self.sot_id] + list(enc.ids)[: c - 2] + [self.eot_id]
            out[i, : len(row)] = row
        return out

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"sot={self.sot_id}, eot={self.eot_id}, source={self.source!r})")


def _merge_pair(line: str) -> tuple[str, str]:
    """One BPE merge, ``"a b"`` -> ``("a", "b")``; ValueError naming a malformed line."""
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"a BPE merge is two symbols separated by a space, got {line!r}")
    return parts[0], parts[1]


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """The CLIP BPE pipeline of the ``tokenizers`` library over a vocab and merges."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _Backend
    from tokenizers.models import BPE

    unk = next((n for n in _EOT_NAMES if n in vocab), None)
    backend = _Backend(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                           end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = [n for n in _SOT_NAMES + _EOT_NAMES if n in vocab]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    return backend


_DEFAULT: Tokenizer | None = None


def default_tokenizer(context_length: int = 77) -> Tokenizer:
    """OpenAI's CLIP tokenizer from the bundled merges file (shared by OpenAI, LAION, DataComp,
    DFN and MetaCLIP models).

    Examples
    --------
    >>> default_tokenizer()("hello").shape
    (1, 77)
    """
    global _DEFAULT
    if _DEFAULT is None:
        if not os.path.exists(DEFAULT_BPE):
            raise FileNotFoundError(f"the bundled CLIP vocabulary {DEFAULT_BPE} is missing; "
                                    "reinstall clipdecomp or pass a tokenizer.json")
        _DEFAULT = Tokenizer.from_bpe_gz(DEFAULT_BPE)
    if context_length == _DEFAULT.context_length:
        return _DEFAULT
    return Tokenizer(_DEFAULT.backend, context_length, _DEFAULT.sot_id, _DEFAULT.eot_id,
                     source=_DEFAULT.source)


def find_tokenizer(directory: str | os.PathLike[str],
                   context_length: int = 77) -> Tokenizer | None:
    """The tokenizer stored in a checkpoint directory, or None when it holds none.

    Looks for ``tokenizer.json``, then ``vocab.json`` + ``merges.txt``.
    """
    directory = os.fspath(directory)
    tj = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tj):
        return Tokenizer.from_file(tj, context_length)
    vj, mt = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if os.path.isfile(vj) and os.path.isfile(mt):
        return Tokenizer.from_vocab_merges(vj, mt, context_length)
    return None

