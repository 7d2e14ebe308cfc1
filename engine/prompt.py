"""Prompt admission shared by the in-process engine and the router: text (raw or chat) or token ids
in, validated token ids out, or InvalidRequest with a message a user can act on."""
from __future__ import annotations

from pdserve.errors import InvalidRequest


def prompt_ids(tokenizer, vocab_size: int, max_model_len: int, prompt: str | None = None,
               prompt_token_ids: list[int] | None = None, chat: bool = False) -> list[int]:
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
