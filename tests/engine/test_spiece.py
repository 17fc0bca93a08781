"""SentencePiece model files without sentencepiece (engine/spiece.py) and SigLIP v1's tokenizer.

References: the ``sentencepiece`` package (a unigram model trained here on a generated corpus,
its protobuf classes and ``SentencePieceProcessor.encode``) and transformers' slow
``SiglipTokenizer`` (which runs sentencepiece); ids must be equal, not close. The end-to-end
test compares text features with transformers' ``SiglipModel`` within 1e-4 relative.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from clipdecomp.engine.siglip import SiglipTokenizer, canonicalize, load_siglip
from clipdecomp.engine.spiece import (
    CharsMap,
    encode,
    normalize,
    parse_model,
    read_model,
    unigram_tokenizer,
)

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "photo", "of", "cat", "dog", "bird", "red", "blue", "green", "small",
         "large", "picture", "painting", "house", "car", "tree", "river", "mountain", "city",
         "night", "day", "person", "man", "woman", "child", "running", "sitting", "on", "in",
         "with", "and", "at", "under", "over", "two", "three", "café", "naïve", "über", "straße",
         "東京", "日本", "école"]

#: texts with punctuation, capitals, digits, unicode (NFKC forms, accents written as combining
#: marks, CJK, Greek with a final sigma), whitespace of every kind, unknown characters, the
#: word-boundary symbol itself, and the empty text
TEXTS = [
    "", " ", "\t\n", "a photo of a cat", "A Photo, of a CAT!", "a photo of a cat.",
    "  leading and trailing   spaces  ", "tabs\tand\nnewlines\r\nand\u3000ideographic\xa0nbsp",
    "digits 0123456789 and 3.14159 and 1,000,000", "①②③ ½ ﬁne ﬂat Ⅻ ＡＢＣ ｶﾀｶﾅ",
    "café naïve über straße école", "cafe\u0301 nai\u0308ve", "東京 日本 大阪 北京",
    "ΟΔΟΣ σοφός ΣΟΦΟΣ", "Tiếng Việt người được", "ǖǘǚǜ lüe4", "①\u0301 ﬁ\u0308 A\u0301\u0301",
    "zzz qqq xxx jjj", "emoji 🐱 🐶 and ✨", "⁇ � \u200b zero\u200bwidth",
    "\u2581", "\u2581\u2581x", "hello\u2581world\u2581", "'quotes' \"double\" (brackets) [x] {y}",
    "a-b_c/d\\e|f~g`h^i@j#k$l%m&n*o+p=q<r>s?t", "İstanbul ﬀ Ǆ ǈ", "x" * 300,
    " ".join(["a photo of a small red car"] * 20), "a </s>", "a photo </s>  ",
    "a </s> photo <unk> of </s></s> a cat", "</s>", "  </s> x", "<unk>Жx ЖЖ</s>Ж",
    " ".join(["dog"] * 62) + " </s>", " ".join(["dog"] * 63) + " </s>", "\u2581</s>",
]


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        if rng.random() < 0.3:
            s = s.capitalize() + rng.choice([".", "!", ",", "?"])
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 9999)}"
        lines.append(s)
    return lines


def _train(tmp_path_factory, model_type: str, vocab_size: int, rule: str = "nmt_nfkc") -> str:
    d = tmp_path_factory.mktemp(f"spm_{model_type}_{rule}")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_corpus(4000, 0)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "m"), vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
        num_threads=1, normalization_rule_name=rule)
    return str(d / "m.model")


@pytest.fixture(scope="module")
def unigram(tmp_path_factory) -> str:
    """A unigram model with SigLIP's special pieces (pad 0, eos 1, unk 2), nmt_nfkc."""
    return _train(tmp_path_factory, "unigram", 250)


@pytest.fixture(scope="module")
def siglip_dir(unigram, tmp_path_factory) -> str:
    """A directory as SigLIP's repositories ship it: spiece.model and tokenizer_config.json,
    written by transformers' SiglipTokenizer."""
    d = str(tmp_path_factory.mktemp("siglip_tok"))
    transformers.SiglipTokenizer(unigram).save_pretrained(d)
    assert not os.path.exists(os.path.join(d, "tokenizer.json"))
    return d


def random_texts(n: int, seed: int) -> list[str]:
    """Caption-like texts and random strings over letters, digits, punctuation, accents,
    CJK, compatibility forms and whitespace."""
    rng = random.Random(seed)
    chars = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'\"-()éèüñß東京日本ΟΔΣ①ﬁ½\t\n"
                 "\u3000\xa0\u200b\u2581") + ["</s>", "<unk>", "<pad>", " </s> "]
    out = []
    for i in range(n):
        if i % 4 == 1:  # decomposed accents, stacked combining marks
            out.append(unicodedata.normalize("NFD", rng.choice(TEXTS)) + "\u0301" * (i % 3))
        elif i % 2:
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(0, 40))))
        else:
            k = rng.randint(1, 90 if i % 10 == 0 else 10)
            out.append(" ".join(rng.choice(WORDS) for _ in range(k)) + rng.choice(
                ["", " ", ".", "!", "  x", "日"]))
    return out


# ----------------------------------------------------------------------------------------------
# the file


def test_reader_matches_protobuf(unigram):
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(unigram, "rb") as fh:
        proto = pb.ModelProto.FromString(fh.read())
    m = read_model(unigram)
    assert len(m.pieces) == len(proto.pieces) == 250
    types = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
    for ours, ref in zip(m.pieces, proto.pieces):
        assert (ours.piece, ours.score, ours.type) == (ref.piece, pytest.approx(ref.score, abs=0),
                                                       types[ref.type])
    assert m.model_type == "unigram"
    assert (m.unk_id, m.eos_id, m.pad_id, m.bos_id) == (2, 1, 0, -1)
    assert m.normalizer_name == proto.normalizer_spec.name == "nmt_nfkc"
    assert m.precompiled_charsmap == proto.normalizer_spec.precompiled_charsmap
    assert m.add_dummy_prefix and m.remove_extra_whitespaces and m.escape_whitespaces
    assert m.piece_id("</s>") == 1 and m.piece_id("no such piece") is None


def test_reader_fields_set_by_hand(unigram):
    """Non-default spec values and a negative int32, written by protobuf itself."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(unigram, "rb") as fh:
        proto = pb.ModelProto.FromString(fh.read())
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.trainer_spec.pad_id = -1
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    m = parse_model(proto.SerializeToString())
    assert not m.add_dummy_prefix and not m.remove_extra_whitespaces
    assert m.pad_id == -1 and m.model_type == "bpe"


def test_malformed_files_raise(unigram, tmp_path):
    with open(unigram, "rb") as fh:
        data = fh.read()
    for cut in (1, 7, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.model"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a SentencePiece model file|unknown piece"):
            read_model(p)
    cases = {
        b"": "no pieces",
        b"\xff" * 12: "varint longer than 10 bytes",
        b"\x0b\x00": "wire type 3",
        b"\x0a\x05\x0a\x03ab": "past the end",
        b"\x08\x01": "field pieces has wire type 0",
        b"\x0a\x04\x0a\x02\xff\xfe": "not UTF-8",
        b"\x12\x07\xc0\x02\x80\x80\x80\x80\x10": "trainer_spec.unk_id 4294967296 is not an int32",
        b"\x0a\x03\x0a\x01a": "no trainer_spec",
        b"\x0a\x03\x0a\x01a\x12\x00\x1a\x00": "exactly one unknown piece",
    }
    for raw, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            parse_model(raw)
    p = tmp_path / "text.model"
    p.write_text("this is not a model\n")
    with pytest.raises(ValueError, match="not a SentencePiece model file"):
        read_model(p)


def test_bpe_and_unsupported_models_refused(tmp_path_factory, tmp_path, unigram):
    from sentencepiece import sentencepiece_model_pb2 as pb

    bpe = _train(tmp_path_factory, "bpe", 250)
    with pytest.raises(ValueError, match="bpe model; only unigram"):
        unigram_tokenizer(read_model(bpe))
    d = tmp_path / "bpe"
    d.mkdir()
    shutil.copy(bpe, d / "spiece.model")
    with pytest.raises(ValueError, match="spiece.model: a SentencePiece bpe model"):
        SiglipTokenizer.from_dir(d)
    with open(unigram, "rb") as fh:
        proto = pb.ModelProto.FromString(fh.read())
    proto.trainer_spec.byte_fallback = True
    with pytest.raises(ValueError, match="byte_fallback"):
        unigram_tokenizer(parse_model(proto.SerializeToString()))
    with pytest.raises(ValueError, match="outside the 250 pieces"):
        unigram_tokenizer(read_model(unigram), eos=250)


# ----------------------------------------------------------------------------------------------
# SentencePiece's segmentation


def test_encode_matches_sentencepiece(unigram):
    sp = spm.SentencePieceProcessor(model_file=unigram)
    tok = unigram_tokenizer(read_model(unigram))
    texts = TEXTS + random_texts(1500, 1) + ["<pad> </s> <unk>", "a</s>b<unk>"]
    for t in texts:
        assert tok.encode(t).ids == sp.encode(t), repr(t)


def test_normalize_matches_sentencepiece(unigram):
    sp = spm.SentencePieceProcessor(model_file=unigram)
    m = read_model(unigram)
    for t in TEXTS + random_texts(1000, 6):
        assert normalize(m, t) == sp.normalize(t), repr(t)
    # the same without splitting at spaces first (the path for a map whose keys hold spaces)
    whole = read_model(unigram)
    cmap = whole._charsmap()
    assert cmap is not None and cmap.space_free
    cmap.space_free = False
    for t in TEXTS + random_texts(300, 9):
        assert normalize(whole, t) == sp.normalize(t), repr(t)
    # the character map by longest key: NFD pinyin, where tokenizers' Precompiled drops marks
    assert normalize(m, unicodedata.normalize("NFD", "lǖ")) == "\u2581lǖ"


def test_identity_normalization(tmp_path_factory):
    """A model without a character map: U+2581 and U+3000 are left alone."""
    path = _train(tmp_path_factory, "unigram", 250, rule="identity")
    m = read_model(path)
    assert m.normalizer_name == "identity" and m.precompiled_charsmap == b""
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = unigram_tokenizer(m)
    for t in TEXTS + random_texts(500, 7):
        assert tok.encode(t).ids == sp.encode(t), repr(t)


def test_malformed_charsmap_raises(unigram):
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(unigram, "rb") as fh:
        proto = pb.ModelProto.FromString(fh.read())
    good = proto.normalizer_spec.precompiled_charsmap
    n = int.from_bytes(good[:4], "little")
    for blob, msg in ((good[:3], "header"), (b"\xff\xff\x00\x00" + good[4:100], "does not fit"),
                      (good[:4] + b"\xff" * n + good[4 + n:], "outside"),
                      (good[:4 + n] + b"\xff" * (len(good) - 4 - n), "not UTF-8")):
        proto.normalizer_spec.precompiled_charsmap = blob
        m = parse_model(proto.SerializeToString())
        with pytest.raises(ValueError, match=f"precompiled_charsmap.*{msg}"):
            unigram_tokenizer(m)
    assert CharsMap(good).longest_prefix("①".encode(), 0) == (3, b"1")


def test_encode_without_dummy_prefix_or_whitespace_removal(unigram):
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(unigram, "rb") as fh:
        proto = pb.ModelProto.FromString(fh.read())
    for prefix, remove in ((False, True), (True, False), (False, False)):
        proto.normalizer_spec.add_dummy_prefix = prefix
        proto.normalizer_spec.remove_extra_whitespaces = remove
        data = proto.SerializeToString()
        sp = spm.SentencePieceProcessor(model_proto=data)
        tok = unigram_tokenizer(parse_model(data))
        for t in ["a photo", "  a   photo  ", "", " ", "x\u3000 y\t", "東京 cat  "] + \
                random_texts(200, 2):
            assert tok.encode(t).ids == sp.encode(t), (prefix, remove, repr(t))


def test_ties_broken_as_sentencepiece_does():
    """Pieces that repeat one letter (g, gg, ggg) segment a run of it in many ways of equal or
    nearly equal score; SentencePiece decides by its float32 sums. Random scores, random runs
    after unknown characters and other pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    rng = random.Random(0)
    texts = ["".join(rng.choice(["g", "g", "g", "f", "日", " ", "gg"]) for _ in range(rng.randint(1, 30)))
             for _ in range(400)]
    for seed in range(6):
        r = random.Random(seed)
        proto = pb.ModelProto()
        for piece, kind in (("<pad>", 3), ("</s>", 3), ("<unk>", 2)):
            proto.pieces.add(piece=piece, score=0.0, type=kind)
        for piece in ("\u2581", "g", "gg", "ggg", "f", "fg", "\u2581g", "\u2581gg"):
            proto.pieces.add(piece=piece, score=-r.uniform(1, 12), type=1)
        proto.trainer_spec.model_type = 1
        proto.trainer_spec.unk_id = 2
        proto.normalizer_spec.name = "identity"
        data = proto.SerializeToString()
        sp = spm.SentencePieceProcessor(model_proto=data)
        m = parse_model(data)
        tok = unigram_tokenizer(m)
        for t in texts:
            want = sp.encode(t)
            assert encode(m, t) == want, (seed, repr(t))
            assert tok.encode(t).ids == want, (seed, repr(t))


def test_unknown_characters_merge_into_one_piece(unigram):
    sp = spm.SentencePieceProcessor(model_file=unigram)
    tok = unigram_tokenizer(read_model(unigram))
    ids = tok.encode("a ЖЖЖЖ cat").ids
    assert ids == sp.encode("a ЖЖЖЖ cat")
    assert ids.count(2) == 1


# ----------------------------------------------------------------------------------------------
# SigLIP v1's tokenizer


def test_canonicalize_matches_transformers(unigram):
    ref = transformers.SiglipTokenizer(unigram)
    for t in TEXTS + random_texts(300, 3):
        assert canonicalize(t) == ref.canonicalize_text(t), repr(t)


def test_siglip_ids_match_transformers(siglip_dir):
    ours = SiglipTokenizer.from_dir(siglip_dir)
    assert ours.context_length == 64 and ours.pad_id == 1
    ref = transformers.SiglipTokenizer.from_pretrained(siglip_dir)
    texts = TEXTS + random_texts(2000, 4)
    want = ref(texts, padding="max_length", max_length=64, truncation=True)["input_ids"]
    got = ours(texts)
    assert got.dtype == np.int32 and got.shape == (len(texts), 64)
    for t, g, w in zip(texts, got.tolist(), want):
        assert g == w, repr(t)
    # long texts are cut with the end token kept; short ones end with it, then padding
    assert got[TEXTS.index("x" * 300), -1] == 1
    assert (got[:, -1] == 1).all()


def test_siglip_tokenizer_pickles(siglip_dir):
    import pickle

    tok = SiglipTokenizer.from_dir(siglip_dir, context_length=16)
    again = pickle.loads(pickle.dumps(tok))
    texts = ["a photo of a cat", "Two dogs </s> 3 cats!"]
    assert again.context_length == 16
    assert again(texts).tolist() == tok(texts).tolist()


def test_siglip_ids_without_lower_casing(unigram, tmp_path):
    ref = transformers.SiglipTokenizer(unigram, do_lower_case=False)
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["do_lower_case"] is False
    ours = SiglipTokenizer.from_dir(tmp_path, context_length=16)
    texts = ["A Photo of a CAT", "The Dog, the BIRD.", "Café École"] + random_texts(300, 5)
    want = ref(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    assert ours(texts).tolist() == want


def test_tokenizer_is_complete_for_siglip(unigram):
    """The tokenizers.Tokenizer alone appends the end token and pads to 64, as SigLIP's
    processor does, on canonicalised text."""
    ref = transformers.SiglipTokenizer(unigram)
    m = read_model(unigram)
    tok = unigram_tokenizer(m, eos=m.eos_id, context_length=64, pad_id=m.eos_id)
    texts = ["a photo of a cat", "Two dogs, 3 cats!", "", " ".join(["tree"] * 80)] + \
        random_texts(200, 8)
    for t in [t for t in texts if "<" not in t]:  # no special tokens in the text
        want = ref(t, padding="max_length", max_length=64, truncation=True)["input_ids"]
        assert tok.encode(canonicalize(t)).ids == want, repr(t)


def test_no_sentencepiece_or_transformers_at_runtime(siglip_dir):
    """The tokenizer loads and gives the same ids with both packages unimportable."""
    texts = ["a photo of a cat", "Two Dogs, 3 cats!", "東京 café", ""]
    want = SiglipTokenizer.from_dir(siglip_dir)(texts).tolist()
    code = (
        "import sys, json\n"
        "sys.modules['sentencepiece'] = None\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['google.protobuf'] = None\n"
        "from clipdecomp.engine.siglip import SiglipTokenizer\n"
        f"tok = SiglipTokenizer.from_dir({siglip_dir!r})\n"
        f"print(json.dumps(tok({texts!r}).tolist()))\n"
        "assert 'sentencepiece' not in sys.modules or sys.modules['sentencepiece'] is None\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=root, check=True)
    assert json.loads(out.stdout) == want


# ----------------------------------------------------------------------------------------------
# end to end


def test_siglip_directory_with_spiece_model_only(siglip_dir, tmp_path):
    """A SiglipModel saved beside spiece.model only: load_siglip tokenizes and encodes text as
    transformers' tokenizer + SiglipModel do."""
    import torch

    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        text_config={"hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 5, "vocab_size": 250, "max_position_embeddings": 64,
                     "projection_size": 32})
    m = transformers.SiglipModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    m.save_pretrained(tmp_path)
    for f in os.listdir(siglip_dir):
        shutil.copy(os.path.join(siglip_dir, f), tmp_path / f)
    assert not (tmp_path / "tokenizer.json").exists()
    model = load_siglip(tmp_path, threads=1)
    assert model.tokenizer is not None
    ref = transformers.SiglipTokenizer.from_pretrained(tmp_path)
    texts = ["a photo of a cat", "Two RED cars, under a tree!", "東京 at night", "",
             " ".join(["a small dog"] * 30)]
    ids = ref(texts, padding="max_length", max_length=64, truncation=True,
              return_tensors="pt")["input_ids"]
    assert model.tokenize(texts).tolist() == ids.tolist()
    with torch.no_grad():
        want = m.get_text_features(input_ids=ids)
    want = getattr(want, "pooler_output", want).numpy()
    got = model.encode_text(texts, normalize=False)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4
