"""SentencePiece model files (``spiece.model``) read without the ``sentencepiece`` package.

A ``.model`` file is a serialised protobuf ``ModelProto`` (sentencepiece's
``sentencepiece_model.proto``). It is read here with a small decoder of the protobuf wire
format; a unigram model then encodes text with the ids of
``sentencepiece.SentencePieceProcessor.encode`` (:func:`encode`), also as a
``tokenizers.Tokenizer`` (:func:`unigram_tokenizer`).

The fields read (field numbers of ``sentencepiece_model.proto``)::

    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece (string), 2 score (float), 3 type (NORMAL=1, UNKNOWN=2, CONTROL=3,
                    USER_DEFINED=4, UNUSED=5, BYTE=6)
    TrainerSpec     3 model_type (UNIGRAM=1, BPE=2, WORD=3, CHAR=4), 24 treat_whitespace_as_suffix,
                    35 byte_fallback, 40-43 unk_id, bos_id, eos_id, pad_id (int32)
    NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix,
                    4 remove_extra_whitespaces, 5 escape_whitespaces

How SentencePiece encodes (normalizer.cc, unigram_model.cc), reproduced here in Python:

1. the text is rewritten by the precompiled character map of the normalisation rule
   (``nmt_nfkc``: NFKC and a few more rules, U+2581 among the spaces), longest key first;
2. with ``remove_extra_whitespaces``, leading and trailing spaces are dropped and runs of them
   become one; with ``add_dummy_prefix`` a space is put in front; every space becomes U+2581
   (steps 1-2: :func:`normalize`);
3. Viterbi over the normal pieces with float32 path scores; a character no piece covers is the
   unknown piece with score ``min(normal scores) - 10``, runs of them merged into one
   (:class:`_Unigram`).

``tokenizers``' own ``Precompiled`` normaliser and ``Unigram`` model would be faster but give
other ids on some texts (see :func:`unigram_tokenizer`).

Examples
--------
>>> m = read_model("siglip-base-patch16-224/spiece.model")        # doctest: +SKIP
>>> m.model_type, m.pieces[m.eos_id].piece                         # doctest: +SKIP
('unigram', '</s>')
>>> tok = unigram_tokenizer(m)                                     # doctest: +SKIP
>>> ids = tok.encode("a photo of a cat").ids     # == SentencePieceProcessor.encode(...)
"""
from __future__ import annotations

import math
import os
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CharsMap", "Piece", "SentencePieceModel", "encode", "normalize", "parse_model",
           "read_model", "unigram_tokenizer"]

#: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control",
               USER_DEFINED: "user_defined", UNUSED: "unused", BYTE: "byte"}
#: TrainerSpec.ModelType
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
#: the word-boundary symbol, U+2581 LOWER ONE EIGHTH BLOCK
SPACE_SYMBOL = "\u2581"
#: a file larger than this is not a SentencePiece model (256k pieces take a few MiB)
MAX_FILE_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------
# protobuf wire format


class _Reader:
    """A cursor over one protobuf message: ``fields()`` yields (field number, wire type, value)
    with value an int (varint, fixed32, fixed64) or a memoryview (length-delimited)."""

    def __init__(self, data: bytes | memoryview, what: str):
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def _fail(self, why: str) -> ValueError:
        return ValueError(f"{self.what}: not a SentencePiece model file ({why} at byte "
                          f"{self.pos})")

    def varint(self) -> int:
        shift = value = 0
        while True:
            if self.pos >= len(self.data):
                raise self._fail("truncated varint")
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise self._fail("varint longer than 10 bytes")

    def fixed(self, n: int) -> int:
        if self.pos + n > len(self.data):
            raise self._fail(f"truncated {8 * n}-bit field")
        v = int.from_bytes(self.data[self.pos:self.pos + n], "little")
        self.pos += n
        return v

    def fields(self) -> Any:
        while self.pos < len(self.data):
            key = self.varint()
            num, wire = key >> 3, key & 7
            if num == 0:
                raise self._fail("field number 0")
            if wire == 0:
                yield num, wire, self.varint()
            elif wire == 1:
                yield num, wire, self.fixed(8)
            elif wire == 5:
                yield num, wire, self.fixed(4)
            elif wire == 2:
                n = self.varint()
                if n > len(self.data) - self.pos:
                    raise self._fail(f"length {n} past the end")
                yield num, wire, self.data[self.pos:self.pos + n]
                self.pos += n
            else:  # 3, 4: groups (not used by sentencepiece_model.proto), 6, 7: invalid
                raise self._fail(f"wire type {wire}")


def _expect(r: _Reader, name: str, wire: int, want: int) -> None:
    if wire != want:
        raise r._fail(f"field {name} has wire type {wire}, expected {want}")


def _int32(r: _Reader, v: int, name: str) -> int:
    """A varint as protobuf's int32 (negative values are sign-extended to 64 bits)."""
    v &= (1 << 64) - 1
    if v >= 1 << 63:
        v -= 1 << 64
    if not -(1 << 31) <= v < 1 << 31:
        raise r._fail(f"{name} {v} is not an int32")
    return v


def _text(r: _Reader, v: memoryview, name: str) -> str:
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        raise r._fail(f"{name} is not UTF-8") from None


# ----------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Piece:
    """One vocabulary entry: its string, its log-probability score, its type
    (``"normal"``, ``"unknown"``, ``"control"``, ``"user_defined"``, ``"unused"``, ``"byte"``)."""

    piece: str
    score: float
    type: str = "normal"


@dataclass(frozen=True)
class SentencePieceModel:
    """What a ``.model`` file says that tokenising needs (the rest is skipped).

    ``pieces[i]`` is the piece of id ``i``; ``unk_id`` is the index of the one ``unknown``
    piece; ``bos_id``, ``eos_id``, ``pad_id`` are -1 when the model has none.
    """

    pieces: tuple[Piece, ...]
    model_type: str = "unigram"
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = field(default=b"", repr=False)
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def _charsmap(self) -> CharsMap | None:
        """The parsed ``precompiled_charsmap`` (None for the identity rule), parsed once."""
        if not self.precompiled_charsmap:
            return None
        cached = self.__dict__.get("_cmap")
        if cached is None:
            cached = CharsMap(self.precompiled_charsmap)
            object.__setattr__(self, "_cmap", cached)
        return cached

    def _lattice(self) -> _Unigram:
        """The unigram model's tables (:class:`_Unigram`), built once."""
        cached = self.__dict__.get("_unigram")
        if cached is None:
            cached = _Unigram(self)
            object.__setattr__(self, "_unigram", cached)
        return cached

    def piece_id(self, piece: str) -> int | None:
        """The id of a piece string, or None."""
        for i, p in enumerate(self.pieces):
            if p.piece == piece:
                return i
        return None


def _read_piece(r: _Reader, i: int) -> Piece:
    piece, score, kind = "", 0.0, NORMAL
    for num, wire, v in r.fields():
        if num == 1:
            _expect(r, f"pieces[{i}].piece", wire, 2)
            piece = _text(r, v, f"pieces[{i}].piece")
        elif num == 2:
            _expect(r, f"pieces[{i}].score", wire, 5)
            score = struct.unpack("<f", int(v).to_bytes(4, "little"))[0]
        elif num == 3:
            _expect(r, f"pieces[{i}].type", wire, 0)
            kind = int(v)
    if kind not in _TYPE_NAMES:
        raise r._fail(f"pieces[{i}] has an unknown type {kind}")
    return Piece(piece, score, _TYPE_NAMES[kind])


def _read_trainer(r: _Reader, out: dict[str, Any]) -> None:
    ints = {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    bools = {24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
    for num, wire, v in r.fields():
        if num == 3:
            _expect(r, "trainer_spec.model_type", wire, 0)
            out["model_type"] = _MODEL_TYPES.get(int(v), f"type {v}")
        elif num in ints:
            _expect(r, f"trainer_spec.{ints[num]}", wire, 0)
            out[ints[num]] = _int32(r, int(v), f"trainer_spec.{ints[num]}")
        elif num in bools:
            _expect(r, f"trainer_spec.{bools[num]}", wire, 0)
            out[bools[num]] = bool(v)


def _read_normalizer(r: _Reader, out: dict[str, Any]) -> None:
    bools = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for num, wire, v in r.fields():
        if num == 1:
            _expect(r, "normalizer_spec.name", wire, 2)
            out["normalizer_name"] = _text(r, v, "normalizer_spec.name")
        elif num == 2:
            _expect(r, "normalizer_spec.precompiled_charsmap", wire, 2)
            out["precompiled_charsmap"] = bytes(v)
        elif num in bools:
            _expect(r, f"normalizer_spec.{bools[num]}", wire, 0)
            out[bools[num]] = bool(v)


def parse_model(data: bytes, source: str = "SentencePiece model") -> SentencePieceModel:
    """A :class:`SentencePieceModel` from the bytes of a ``.model`` file.

    Raises
    ------
    ValueError
        For bytes that are not a well-formed ModelProto with pieces and one unknown piece.
    """
    r = _Reader(data, source)
    pieces: list[Piece] = []
    kw: dict[str, Any] = {}
    seen: set[int] = set()
    for num, wire, v in r.fields():
        if num in (2, 3):
            seen.add(num)
        if num == 1:
            _expect(r, "pieces", wire, 2)
            pieces.append(_read_piece(_Reader(v, source), len(pieces)))
        elif num == 2:
            _expect(r, "trainer_spec", wire, 2)
            _read_trainer(_Reader(v, source), kw)
        elif num == 3:
            _expect(r, "normalizer_spec", wire, 2)
            _read_normalizer(_Reader(v, source), kw)
    if not pieces:
        raise ValueError(f"{source}: not a SentencePiece model file (no pieces)")
    if seen != {2, 3}:
        raise ValueError(f"{source}: not a SentencePiece model file (no trainer_spec or "
                         "normalizer_spec: a truncated file?)")
    unknown = [i for i, p in enumerate(pieces) if p.type == "unknown"]
    if len(unknown) != 1:
        raise ValueError(f"{source}: a SentencePiece model has exactly one unknown piece, this "
                         f"one has {len(unknown)}")
    kw["unk_id"] = unknown[0]  # as SentencePiece: the unknown piece, whatever trainer_spec says
    n = len(pieces)
    for name in ("bos_id", "eos_id", "pad_id"):
        if not -1 <= kw.get(name, -1) < n:
            raise ValueError(f"{source}: {name} {kw[name]} is outside the {n} pieces")
    # the proto's defaults are bos 1, eos 2; an id whose piece is not a control piece is unset
    for name, default in (("bos_id", 1), ("eos_id", 2)):
        i = kw.get(name, default)
        if i >= n or (i >= 0 and pieces[i].type != "control"):
            kw[name] = -1
        else:
            kw[name] = i
    return SentencePieceModel(tuple(pieces), **kw)


def read_model(path: str | os.PathLike[str]) -> SentencePieceModel:
    """Read a SentencePiece ``.model`` file (``spiece.model``, ``tokenizer.model``).

    Raises
    ------
    ValueError
        For a file that is not a well-formed SentencePiece model.
    FileNotFoundError
        For a missing file.
    """
    p = os.fspath(path)
    size = os.path.getsize(p)
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{p}: {size} bytes, too large for a SentencePiece model file")
    with open(p, "rb") as fh:
        data = fh.read()
    return parse_model(data, p)


# ----------------------------------------------------------------------------------------------
# normalisation


class CharsMap:
    """SentencePiece's precompiled character map: a darts-clone double-array trie over UTF-8
    byte strings whose values are offsets of NUL-terminated replacements.

    Layout of ``precompiled_charsmap``: a little-endian uint32 ``n``, ``n`` bytes of trie
    (uint32 units), then the replacement strings. A unit holds (darts-clone's
    ``DoubleArrayUnit``) the label in bits 0-7 (bit 31 set for a value unit), the leaf flag in
    bit 8 and the offset in bits 10-31, shifted left by 8 when bit 9 is set.
    """

    def __init__(self, blob: bytes):
        if len(blob) < 4:
            raise ValueError("precompiled_charsmap: shorter than its 4-byte header")
        n = int.from_bytes(blob[:4], "little")
        if n % 4 or n + 4 > len(blob):
            raise ValueError(f"precompiled_charsmap: trie size {n} does not fit the "
                             f"{len(blob)}-byte map")
        self.units = struct.unpack(f"<{n // 4}I", blob[4:4 + n])
        self.strings = blob[4 + n:]
        self._replacements: dict[int, bytes] = {}
        self._check()
        root = (self.units[0] >> 10) << ((self.units[0] & 0x200) >> 6)
        #: the bytes a key can start with
        self.starts = frozenset(c for c in range(256)
                                if self.units[root ^ c] & 0x800000FF == c)
        #: no key starts with or holds a space (nmt_nfkc's): text splits into words at spaces
        self.space_free = 0x20 not in self.starts and not any(
            u & 0x800000FF == 0x20 for u in self.units)
        self._pieces: dict[bytes, tuple[bytes, ...]] = {}

    def _check(self) -> None:
        """Every node's children and every value inside the map, every replacement UTF-8 and
        NUL-terminated: a lookup can then never fail (it runs inside ``tokenizers``, which
        would swallow an error and leave the text unnormalised)."""
        import numpy as np

        u = np.asarray(self.units, np.int64)
        value = (u >> 31) == 1          # a value unit: label bit 31, the value in bits 0-30
        offset = (u >> 10) << ((u & (1 << 9)) >> 6)
        child = np.arange(len(u), dtype=np.int64) ^ offset
        v = u[value] & ((1 << 31) - 1)
        try:
            self.strings.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("precompiled_charsmap: replacements are not UTF-8") from None
        if len(u) == 0 or ((child[~value] | 0xFF) >= len(u)).any() or \
                (v >= len(self.strings)).any() or not self.strings.endswith(b"\0") or \
                ((np.frombuffer(self.strings, np.uint8)[v] & 0xC0) == 0x80).any():
            raise ValueError("precompiled_charsmap: the trie points outside itself")

    def longest_prefix(self, data: bytes, start: int) -> tuple[int, bytes]:
        """(length, replacement) of the longest key at ``data[start:]``; (0, b"") if none."""
        units = self.units
        best, value = 0, 0
        unit = units[0]
        pos = (unit >> 10) << ((unit & 0x200) >> 6)
        for i in range(start, len(data)):
            c = data[i]
            pos ^= c
            unit = units[pos]  # in range: checked for every node when the map was loaded
            if unit & 0x800000FF != c:
                break
            pos ^= (unit >> 10) << ((unit & 0x200) >> 6)
            if unit & 0x100:
                best, value = i + 1 - start, units[pos] & 0x7FFFFFFF
        if not best:
            return 0, b""
        rep = self._replacements.get(value)
        if rep is None:
            rep = self.strings[value:self.strings.index(b"\0", value)]
            self._replacements[value] = rep
        return best, rep

    def pieces(self, data: bytes, cache: bool = True) -> tuple[bytes, ...]:
        """SentencePiece's ``NormalizePrefix`` over ``data``: the replacement of the longest
        key at each place, else the character itself (a UTF-8 string)."""
        if cache:
            got = self._pieces.get(data)
            if got is not None:
                return got
        out = []
        pos, size, starts = 0, len(data), self.starts
        while pos < size:
            lead = data[pos]
            if lead in starts:
                n, rep = self.longest_prefix(data, pos)
                if n:
                    out.append(rep)
                    pos += n
                    continue
            n = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            out.append(data[pos:pos + n])
            pos += n
        result = tuple(out)
        if cache:
            if len(self._pieces) >= 1 << 16:
                self._pieces.clear()
            self._pieces[data] = result
        return result


def normalize(model: SentencePieceModel, text: str) -> str:
    """The text SentencePiece's unigram model segments (``normalizer.cc``): the character map
    applied by longest key, with ``remove_extra_whitespaces`` leading and trailing spaces
    dropped and runs of them kept as one, the dummy prefix, spaces as U+2581. Equals
    ``sentencepiece.SentencePieceProcessor.normalize``.

    Examples
    --------
    >>> normalize(m, "  Hello\u3000world ")                            # doctest: +SKIP
    '▁Hello▁world'
    """
    cmap = model._charsmap()
    data = text.encode("utf-8")
    if cmap is None:
        pieces: list[bytes] = [c.encode("utf-8") for c in text]
    elif cmap.space_free:  # no key holds a space: the words are looked up on their own
        pieces = []
        for k, word in enumerate(data.split(b" ")):
            if k:
                pieces.append(b" ")
            pieces += cmap.pieces(word)
    else:
        pieces = list(cmap.pieces(data, cache=False))
    remove = model.remove_extra_whitespaces
    space = SPACE_SYMBOL.encode()
    k = 0
    if remove:  # leading spaces
        while k < len(pieces) and pieces[k] == b" ":
            k += 1
    if k == len(pieces):
        return ""
    out = bytearray(space if model.add_dummy_prefix else b"")
    prev_space = remove
    for rep in pieces[k:]:
        if prev_space:
            rep = rep.lstrip(b" ")
        if rep:
            out += rep.replace(b" ", space)
            prev_space = rep.endswith(b" ")
        if not remove:
            prev_space = False
    result = out.decode("utf-8")
    return result.rstrip(SPACE_SYMBOL) if remove else result


class _Normalizer:
    """:func:`normalize` as a ``tokenizers`` custom normaliser."""

    def __init__(self, model: SentencePieceModel):
        from tokenizers import Regex

        self.model, self.everything = model, Regex(r"[\s\S]+")

    def normalize(self, normalized: Any) -> None:
        text = normalized.normalized
        out = normalize(self.model, text)
        if out != text:
            normalized.replace(self.everything, out)


# ----------------------------------------------------------------------------------------------
# segmentation

def _f32(x: float) -> float:
    """``x`` rounded to float32."""
    return array("f", [x])[0]


class _Unigram:
    """SentencePiece's unigram segmentation (``unigram_model.cc``, ``EncodeOptimized``).

    The best path ending at each character, left to right: every normal piece starting at a
    character is a candidate for the position it ends at, with the path score up to its start
    plus its own score, summed in float32 as SentencePiece does (it decides between equal and
    nearly equal segmentations, e.g. ``g`` + ``gg`` or ``gg`` + ``g``, by that rounding; a
    float32 sum computed in double and then rounded is the float32 sum); the first candidate
    keeps a tie. A character no piece of length one covers is an unknown piece scoring
    ``min(normal scores) - 10``. Runs of unknown pieces are merged into one.
    """

    def __init__(self, model: SentencePieceModel):
        #: the normal pieces as a trie of dicts, char -> node; a node's "" holds (id, score)
        self.trie: dict[str, Any] = {}
        low = math.inf
        for i, p in enumerate(model.pieces):
            if p.type != "normal":
                continue
            node = self.trie
            for ch in p.piece:
                node = node.setdefault(ch, {})
            node[""] = (i, _f32(p.score))
            low = min(low, _f32(p.score))
        if low == math.inf:
            raise ValueError("a SentencePiece model without normal pieces")
        self.unk_id = model.unk_id
        self.unk_score = _f32(low - 10.0)

    def segment(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each piece of a normalised text, unknown runs merged."""
        n = len(text)
        score = [0.0] * (n + 1)
        start = [-1] * (n + 1)
        ids = [-1] * (n + 1)
        f32 = array("f", [0.0])
        root, unk_id, unk_score = self.trie, self.unk_id, self.unk_score
        for at in range(n):
            here = score[at]
            node = root
            end = at
            single = False
            while end < n:
                child = node.get(text[end])
                if child is None:
                    break
                node = child
                end += 1
                hit = node.get("")
                if hit is not None:
                    f32[0] = hit[1] + here
                    cand = f32[0]
                    if start[end] == -1 or cand > score[end]:
                        score[end], start[end], ids[end] = cand, at, hit[0]
                    if end == at + 1:
                        single = True
            if not single:
                f32[0] = unk_score + here
                cand = f32[0]
                if start[at + 1] == -1 or cand > score[at + 1]:
                    score[at + 1], start[at + 1], ids[at + 1] = cand, at, unk_id
        out: list[tuple[int, int, int]] = []
        end = n
        while end > 0:
            at = start[end]
            if out and ids[end] == unk_id == out[-1][2]:
                out[-1] = (at, out[-1][1], unk_id)
            else:
                out.append((at, end, ids[end]))
            end = at
        out.reverse()
        return out


def encode(model: SentencePieceModel, text: str) -> list[int]:
    """The ids of ``text``: ``sentencepiece.SentencePieceProcessor.encode`` without it.

    Examples
    --------
    >>> encode(read_model("spiece.model"), "a photo of a cat")          # doctest: +SKIP
    """
    return [i for _, _, i in model._lattice().segment(normalize(model, text))]


class _PreTokenizer:
    """:class:`_Unigram`'s segmentation as a ``tokenizers`` custom pre-tokenizer: every piece
    becomes its own pre-token (a WordLevel model then gives its id)."""

    def __init__(self, model: SentencePieceModel):
        self.lattice = model._lattice()

    def split(self, i: int, normalized: Any) -> list[Any]:
        return [normalized[a:b] for a, b, _ in self.lattice.segment(normalized.normalized)]

    def pre_tokenize(self, pretok: Any) -> None:
        pretok.split(self.split)


# ----------------------------------------------------------------------------------------------
# the tokenizer


def unigram_tokenizer(model: SentencePieceModel, *, eos: int | None = None,
                      context_length: int | None = None, pad_id: int | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` that tokenises text as SentencePiece does with ``model``.

    Its normaliser is :func:`normalize`, its pre-tokenizer splits the normalised text into
    the pieces of SentencePiece's segmentation (:class:`_Unigram`), and a WordLevel model gives
    each its id (a run of unknown characters: the unknown id). ``tokenizers``' own
    ``Precompiled`` normaliser and ``Unigram`` model are not used: the first takes the shortest
    key of a grapheme and drops the rest of it, the second sums scores in float64, where
    SentencePiece's float32 sums decide between equal segmentations (``g`` + ``gg`` or
    ``gg`` + ``g``); both give other ids on some texts.

    Parameters
    ----------
    model : SentencePieceModel
        A unigram model (:func:`read_model`).
    eos : int, optional
        The id of a piece appended to every encoding (SigLIP: ``model.eos_id``, ``</s>``).
    context_length : int, optional
        Cut every encoding to this many ids (keeping ``eos``) and pad it to this length with
        ``pad_id`` (default: the model's pad id, else ``eos``). With ``eos=model.eos_id``,
        ``context_length=64`` and ``pad_id=model.eos_id`` this is SigLIP's tokenizer for text
        that is already canonicalised (``clipdecomp.engine.siglip.canonicalize``).

    Returns
    -------
    tokenizers.Tokenizer
        Without the options, ``tok.encode(text).ids == encode(model, text)``, the ids of
        ``sentencepiece.SentencePieceProcessor(model_file=...).encode(text)``. Its normaliser
        and pre-tokenizer are Python objects: it cannot be saved to JSON or pickled.

    Raises
    ------
    ValueError
        For a model that is not a unigram model or that uses features this reader does not
        reproduce (user-defined pieces, byte fallback, whitespace as suffix, whitespace not
        escaped).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if model.model_type != "unigram":
        raise ValueError(f"a SentencePiece {model.model_type} model; only unigram models "
                         "(SigLIP's, T5's) are supported without the sentencepiece package")
    if model.byte_fallback or model.treat_whitespace_as_suffix or not model.escape_whitespaces \
            or any(p.type in ("user_defined", "byte") for p in model.pieces):
        raise ValueError("a SentencePiece model with user-defined pieces, byte_fallback, "
                         "treat_whitespace_as_suffix or without escape_whitespaces is not "
                         "supported")
    n = len(model.pieces)
    for name, i in (("eos", eos), ("pad_id", pad_id)):
        if i is not None and not 0 <= i < n:
            raise ValueError(f"{name} {i} is outside the {n} pieces")
    model._charsmap()  # a malformed map fails here, not inside tokenizers (which hides errors)
    model._lattice()
    # the pre-tokens are normal pieces or runs of unknown characters; the other pieces get a
    # name with a leading space, which no normalised text holds
    vocab = {(p.piece if p.type == "normal" else " " + p.piece): i
             for i, p in enumerate(model.pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" " + model.pieces[model.unk_id].piece))
    tok.normalizer = normalizers.Normalizer.custom(_Normalizer(model))
    tok.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(_PreTokenizer(model))
    tok.decoder = decoders.Metaspace(replacement=SPACE_SYMBOL, prepend_scheme=(
        "always" if model.add_dummy_prefix else "never"), split=False)
    if eos is not None:
        name = model.pieces[eos].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {name}", pair=f"$A {name} $B {name}", special_tokens=[(name, eos)])
    if context_length is not None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if pad_id is None:
            pad_id = model.pad_id if model.pad_id >= 0 else (eos if eos is not None
                                                             else model.unk_id)
        tok.enable_truncation(max_length=int(context_length))
        tok.enable_padding(length=int(context_length), pad_id=int(pad_id),
                           pad_token=model.pieces[pad_id].piece)
    return tok
