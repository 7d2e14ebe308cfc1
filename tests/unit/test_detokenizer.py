"""The incremental detokenizer (engine/detokenizer.py): streamed deltas concatenate to what the tokenizer decodes
in one call, a multi-byte character split across tokens is held back until it is complete, and the byte-level
table and the windowed fallback agree."""
from __future__ import annotations

import random

import pytest

from pdserve.engine.detokenizer import IncrementalDetokenizer, token_bytes_table

TEXT = "Grüße aus Köln 🌍🚀 — 日本語のテキスト, ça va? naïve café 👩‍👩‍👧 Ελληνικά ∑∫ 한국어"


class _Windowed:
    """The engine's tokenizer with the byte table switched off: the fallback path."""

    def __init__(self, tok):
        self.hf, self.token_bytes = tok.hf, None

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=True)


def _stream(tok, ids, step=1):
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(d.flush())
    assert "".join(deltas) == d.text
    return deltas


@pytest.fixture(scope="module")
def tok(engine_f32):
    return engine_f32.tokenizer


def test_the_embedded_tokenizer_gets_a_byte_table(tok):
    table = tok.token_bytes
    assert table is not None and len(table) == len(tok.hf)
    assert all(table[i] == b"" for i in tok.hf.all_special_ids)
    assert table[tok.hf.convert_tokens_to_ids("Ġthe")] == b" the"


@pytest.mark.parametrize("windowed", [False, True])
def test_multibyte_characters_split_across_tokens_are_never_broken(tok, windowed):
    t = _Windowed(tok) if windowed else tok
    ids = tok.hf.encode(TEXT, add_special_tokens=False)
    deltas = _stream(t, ids)
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == TEXT
    assert sum(1 for x in deltas if x == "") > 0  # some tokens were partial characters, held back


def test_byte_table_equals_one_decode_call_on_random_ids(tok):
    """Random ids (special ones, ids the tokenizer lacks, broken UTF-8) streamed in random steps: the text is what
    decode() of the whole list gives, including its U+FFFD for bytes that never form a character."""
    rng = random.Random(7)
    vocab = len(tok.hf)
    for trial in range(40):
        ids = [rng.randrange(vocab + 50) for _ in range(rng.randrange(1, 60))]
        deltas = _stream(tok, ids, step=rng.randrange(1, 4))
        assert "".join(deltas) == tok.decode([i for i in ids if i < vocab]), trial


def test_sentencepiece_byte_fallback_tokenizer():
    """A Llama-2-style tokenizer (Metaspace, <0xXX> byte fallback, Sequence decoder), built here from parts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁hi", "▁the", "h", "i"]
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 clean_up_tokenization_spaces=False)
    table = token_bytes_table(hf)
    assert table is not None
    assert table[pieces.index("<0xE2>")] == b"\xe2" and table[pieces.index("▁the")] == b" the"

    class Tok:
        token_bytes = table

    ids = [pieces.index("▁hi")] + [3 + b for b in "→😀".encode()] + [pieces.index("▁the"), 2]
    deltas = _stream(Tok(), ids)
    assert "".join(deltas) == " hi→😀 the"  # mid-text: the leading space stays (Strip only trims a whole text)
    assert deltas[1:4] == ["", "", "→"]


def test_other_decoders_take_the_windowed_path():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "hi": 1, "##s": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert token_bytes_table(hf) is None
