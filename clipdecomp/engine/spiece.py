"""SentencePiece model files (``spiece.model``) read without the ``sentencepiece`` package.

A ``.model`` file is a serialised protobuf ``ModelProto`` (sentencepiece's
``sentencepiece_model.proto``). It is read here with a small decoder of the protobuf wire
format, and a unigram model becomes a ``tokenizers.Tokenizer`` whose ids are those of
``sentencepiece.SentencePieceProcessor.encode`` for the same text.

The fields read (field numbers of ``sentencepiece_model.proto``)::

    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece (string), 2 score (float), 3 type (NORMAL=1, UNKNOWN=2, CONTROL=3,
                    USER_DEFINED=4, UNUSED=5, BYTE=6)
    TrainerSpec     3 model_type (UNIGRAM=1, BPE=2, WORD=3, CHAR=4), 24 treat_whitespace_as_suffix,
                    35 byte_fallback, 40-43 unk_id, bos_id, eos_id, pad_id (int32)
    NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix,
                    4 remove_extra_whitespaces, 5 escape_whitespaces

How SentencePiece encodes (normalizer.cc, unigram_model.cc), and how the Tokenizer mirrors it:

1. the text is mapped by the precompiled character map of the normalisation rule (``nmt_nfkc``:
   NFKC plus a few extra rules) -> ``normalizers.Precompiled``; the word-boundary symbol
   U+2581 in the input counts as a space;
2. with ``remove_extra_whitespaces``, leading and trailing spaces are dropped and runs of spaces
   become one; with ``add_dummy_prefix`` a space is put in front; every space becomes U+2581;
3. Viterbi over the pieces (NORMAL and USER_DEFINED pieces only; a character no piece covers
   is the unknown piece with score ``min(scores) - 10``, runs of them merged into one)
   -> ``models.Unigram``.

Examples
--------
>>> m = read_model("siglip-base-patch16-224/spiece.model")        # doctest: +SKIP
>>> m.model_type, len(m.pieces), m.unk_id, m.eos_id               # doctest: +SKIP
('unigram', 32000, 2, 1)
>>> tok = unigram_tokenizer(m)                                     # doctest: +SKIP
>>> tok.encode("a photo of a cat").ids                             # doctest: +SKIP
[3, 9, 1202, 13, 3, 1712]
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Piece", "SentencePieceModel", "parse_model", "read_model", "unigram_tokenizer"]

#: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control",
               USER_DEFINED: "user_defined", UNUSED: "unused", BYTE: "byte"}
#: TrainerSpec.ModelType
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
#: the word-boundary symbol, U+2581 LOWER ONE EIGHTH BLOCK
SPACE_SYMBOL = "\u2581"
#: a file larger than this is not a SentencePiece model (the 256k-piece Gemma one is 4 MiB)
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


def _int32(v: int) -> int:
    """A varint as protobuf's int32 (negative values are sign-extended to 64 bits)."""
    v &= (1 << 64) - 1
    if v >= 1 << 63:
        v -= 1 << 64
    if not -(1 << 31) <= v < 1 << 31:
        raise ValueError(f"int32 field out of range: {v}")
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
            out[ints[num]] = _int32(int(v))
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
    if "unk_id" in kw and kw["unk_id"] != unknown[0]:
        raise ValueError(f"{source}: trainer_spec.unk_id {kw['unk_id']} is not the unknown "
                         f"piece {unknown[0]}")
    kw["unk_id"] = unknown[0]
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
# the tokenizer


def unigram_tokenizer(model: SentencePieceModel, *, after_text: bool = False,
                      special_tokens: Sequence[str] = (), eos: str | None = None,
                      context_length: int | None = None, pad_id: int | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` that segments text as SentencePiece does with ``model``.

    Parameters
    ----------
    model : SentencePieceModel
        A unigram model (:func:`read_model`).
    after_text : bool
        Encode every text as SentencePiece encodes it when it follows other, non-space text:
        no dummy prefix, and leading spaces kept as one word boundary. transformers'
        ``SiglipTokenizer`` encodes that way (it encodes ``"<unk>" + text`` and drops the
        pieces of ``"<unk>"``; it puts the boundary in front of the text itself).
    special_tokens : sequence of str
        Pieces matched in the raw text before normalisation and given their own id (the
        ``tokenizers`` added-token rules: every stretch of text between them is normalised on
        its own).
    eos : str, optional
        A piece appended to every encoding (SigLIP: ``"</s>"``).
    context_length : int, optional
        Cut every encoding to this many ids (keeping ``eos``) and pad it to this length with
        ``pad_id`` (default: the model's pad id, else the ``eos`` id).

    Returns
    -------
    tokenizers.Tokenizer
        Without the options, ``tok.encode(text).ids`` equals
        ``sentencepiece.SentencePieceProcessor(model_file=...).encode(text)`` for a text that
        does not contain the string of a control piece (``"</s>"``: SentencePiece never
        matches those, ``tokenizers`` does unless they are ``special_tokens``).

    Raises
    ------
    ValueError
        For a model that is not a unigram model or that uses features this reader does not
        reproduce (user-defined pieces, byte fallback, whitespace as suffix, whitespace not
        escaped).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    if model.model_type != "unigram":
        raise ValueError(f"a SentencePiece {model.model_type} model; only unigram models "
                         "(SigLIP's, T5's) are supported without the sentencepiece package")
    if model.byte_fallback or model.treat_whitespace_as_suffix or not model.escape_whitespaces \
            or any(p.type in ("user_defined", "byte") for p in model.pieces):
        raise ValueError("a SentencePiece model with user-defined pieces, byte_fallback, "
                         "treat_whitespace_as_suffix or without escape_whitespaces is not "
                         "supported")
    ids = {p.piece: i for i, p in enumerate(model.pieces)}
    for s in (*special_tokens, *([eos] if eos is not None else [])):
        if s not in ids:
            raise ValueError(f"special token {s!r} is not a piece of the model")
    normal = [p.score for p in model.pieces if p.type == "normal"]
    if not normal:
        raise ValueError("a SentencePiece model without normal pieces")
    # the unknown score is the lowest normal score minus 10 in both libraries; tokenizers takes
    # the minimum over every piece, so the others must not score lower than the normal ones
    low = min(normal)
    vocab = [(p.piece, p.score if p.type == "normal" else low) for p in model.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=model.unk_id, byte_fallback=False))

    # SentencePiece: U+2581 is a space; the character map; with remove_extra_whitespaces no
    # leading or trailing spaces and runs of them as one; the dummy prefix (after the leading
    # spaces are gone, and only for a text that was not empty); spaces become U+2581
    prefix = model.add_dummy_prefix and not after_text
    steps: list[Any] = [normalizers.Replace(SPACE_SYMBOL, " ")]
    if prefix and not model.remove_extra_whitespaces:
        steps.append(normalizers.Prepend(" "))
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(" +$"), "")]
        if not after_text:
            steps.append(normalizers.Replace(Regex("^ +"), ""))
        if prefix:
            steps.append(normalizers.Prepend(" "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_SYMBOL,
                                                 prepend_scheme="never", split=False)
    tok.decoder = decoders.Metaspace(replacement=SPACE_SYMBOL,
                                     prepend_scheme="always" if prefix else "never", split=False)
    if special_tokens:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in special_tokens])
    if eos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, ids[eos])])
    if context_length is not None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if pad_id is None:
            pad_id = model.pad_id if model.pad_id >= 0 else (ids[eos] if eos else model.unk_id)
        if not 0 <= pad_id < len(model.pieces):
            raise ValueError(f"pad_id {pad_id} is outside the {len(model.pieces)} pieces")
        tok.enable_truncation(max_length=int(context_length))
        tok.enable_padding(length=int(context_length), pad_id=int(pad_id),
                           pad_token=model.pieces[pad_id].piece)
    return tok
