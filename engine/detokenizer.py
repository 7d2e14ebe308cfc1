"""Incremental detokenization: output token ids in, text deltas out, never a broken character.

The fast path is byte-level: every token id maps to the bytes it stands for (a table built once per
tokenizer), and an incremental UTF-8 decoder turns the running byte stream into text, holding back an
incomplete character until the bytes that finish it arrive. A token then costs a list lookup and a
decoder call, where decoding windows of ids through the tokenizer twice per token cost two Rust calls
with Python-side list slicing (BENCHMARKS.md, "Detokenizer").

The table covers tokenizers whose decoder is a pure byte mapping (`decode(ids)` equals the UTF-8
decoding, errors replaced, of the concatenated token bytes, special tokens skipped):
- ByteLevel (GPT-2 style BPE: Llama-3, Qwen2, SmolLM2, Mistral-Nemo): each character of a token's string
  is one byte through GPT-2's bytes_to_unicode map;
- SentencePiece-style Sequence decoders made of Replace("▁", " ") / ByteFallback / Fuse (Llama-2, Mistral):
  `<0xAB>` tokens are byte 0xAB, "▁" is a space. Their trailing Strip(" ", 1, 0) removes the space the
  encoder prepended to the whole text; output tokens sit mid-text, so a delta keeps its leading space, as
  the windowed decoding below does.
Anything else (or clean_up_tokenization_spaces on, which rewrites across token boundaries) takes the
windowed path: decode a short window before the new tokens and emit what it adds.
"""
from __future__ import annotations

import codecs
import json
from functools import lru_cache


@lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character each byte is spelled with -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _sentencepiece_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode()


def token_bytes_table(hf) -> list[bytes] | None:
    """bytes of every token id of an HF fast tokenizer (b"" for special tokens), or None where decoding is not a
    per-token byte mapping (see the module docstring)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or getattr(hf, "clean_up_tokenization_spaces", False):
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kind = decoder.get("type")
    if kind == "ByteLevel":
        byte_of = _gpt2_byte_decoder()

        def spell(token: str) -> bytes | None:
            try:
                return bytes(byte_of[c] for c in token)
            except KeyError:
                return None
    elif kind == "Sequence" and {d.get("type") for d in decoder.get("decoders", [])} <= {
            "Replace", "ByteFallback", "Fuse", "Strip"} and all(
            d.get("type") != "Replace" or (d.get("pattern", {}).get("String"), d.get("content")) == ("▁", " ")
            for d in decoder.get("decoders", [])):
        spell = _sentencepiece_bytes
    else:
        return None
    # skip_special_tokens skips every added token flagged special, not only those in all_special_ids
    special = set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    table = []
    for i, token in enumerate(hf.convert_ids_to_tokens(list(range(len(hf))))):
        if i in special:
            table.append(b"")
        elif i in added:  # added tokens are stored as their text, not in the byte spelling
            table.append(added[i].encode())
        else:
            b = spell(token) if token is not None else None
            if b is None:
                return None  # a token this mapping cannot spell: not a byte-level vocabulary after all
            table.append(b)
    return table


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas (`add`), and the held-back tail at the end (`flush`).

    `text` is everything emitted so far. Ids the tokenizer does not know (a model whose vocabulary is larger
    than its tokenizer's) decode to nothing, as in `Tokenizer.decode`."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.table = tokenizer.token_bytes
        self.text = ""
        if self.table is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self.ids = list(prompt_ids[-6:])  # context so the first output token decodes as it would mid-text
            self.prefix_offset = 0
            self.read_offset = len(self.ids)

    def add(self, new_ids: list[int]) -> str:
        if self.table is not None:
            t, n = self.table, len(self.table)
            delta = self._utf8.decode(b"".join(t[i] for i in new_ids if 0 <= i < n))
        else:
            delta = self._add_windowed(new_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (a truly broken tail decodes as U+FFFD)."""
        if self.table is not None:
            delta = self._utf8.decode(b"", final=True)
        else:
            full = self.tok.decode(self.ids[self.prefix_offset:])
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def _add_windowed(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd"):
            return ""  # an incomplete character: hold it until the next token completes it
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta
