"""Tokenizer and chat template from the checkpoint (incremental detokenization: engine/detokenizer.py).

GGUF files carry their tokenizer as metadata; transformers converts it (a few seconds), so the
converted tokenizer is cached on disk keyed by the file's size and mtime.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from pdserve.engine.loader import resolve_model_path
from pdserve.errors import InvalidRequest, ModelLoadError


def _cache_dir(gguf_path: str) -> Path:
    st = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return root / "tokenizers" / key


class Tokenizer:
    def __init__(self, model_path: str | None):
        from transformers import AutoTokenizer

        path = resolve_model_path(model_path)
        try:
            if os.path.isdir(path):
                self.hf = AutoTokenizer.from_pretrained(path)
            else:
                cache = _cache_dir(path)
                if (cache / "tokenizer_config.json").exists():
                    self.hf = AutoTokenizer.from_pretrained(str(cache))
                else:
                    d, f = os.path.split(path)
                    self.hf = AutoTokenizer.from_pretrained(d, gguf_file=f)
                    try:
                        self.hf.save_pretrained(str(cache))
                    except OSError:
                        pass  # a read-only home only costs the conversion next time
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the tokenizer of {path}: {e}") from None
        self.eos_token_id = self.hf.eos_token_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def apply_chat_template(self, prompt: str | list[dict]) -> list[int]:
        """A user message (or a message list) rendered with the checkpoint's template + generation prompt."""
        if self.hf.chat_template is None:
            raise ValueError("this model has no chat template; send a raw prompt instead")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def token_bytes(self) -> list[bytes] | None:
        """Each token id's bytes, for the byte-level detokenizer; None where decoding is not a per-token byte
        mapping. Built on first use (a vocabulary of 128K ids takes a fraction of a second)."""
        from pdserve.engine.detokenizer import token_bytes_table

        return token_bytes_table(self.hf)


def prompt_ids(tokenizer, vocab_size: int, max_model_len: int, prompt: str | None = None,
               prompt_token_ids: list[int] | None = None, chat: bool = False) -> list[int]:
    """Prompt admission shared by the in-process engine and the router: text (raw or chat) or token ids in, validated token ids out, or InvalidRequest with a message a user can act on."""
    if prompt_token_ids is not None:
        if prompt is not None:
            raise InvalidRequest("give either a prompt or prompt_token_ids, not both")
        ids = list(prompt_token_ids)
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in ids):
            raise InvalidRequest(f"prompt_token_ids must be integers in [0, {vocab_size})")
    else:
        if not isinstance(prompt, str) or not prompt or (chat and not prompt.strip()):
            raise InvalidRequest("prompt is empty")
        try:
            ids = tokenizer.apply_chat_template(prompt) if chat else tokenizer.encode(prompt)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
    if not ids:
        raise InvalidRequest("prompt is empty")
    if len(ids) >= max_model_len:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; the model's context is {max_model_len} "
                             "and at least one token must be generated")
    return ids
