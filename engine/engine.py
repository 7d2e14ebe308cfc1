"""The engine: requests in, token deltas out. One process, one model replica.

    add_request -> Scheduler.schedule -> ModelRunner.execute -> sample -> stop checks -> RequestOutput

Both worker kinds drive this same loop, each with a KV connector (engine/kv_connector.py): a prefill
worker adds `prefill_only` requests, whose blocks the connector then sends; a decode worker adds requests
with `remote_kv`, which wait until the connector has loaded their prompt KV.

Overlap scheduling (EngineConfig.overlap_schedule; on by default on CUDA), as SGLang's overlap scheduler and
vLLM's async scheduling do it: a step() schedules and launches model step N+1 before the host reads step N's
sampled tokens, then does step N's host half (detokenize, stop checks, outputs) while the device runs N+1, so
the device does not wait for it. A step's outputs thus come from the step() call after the one that launched
it; has_unfinished() stays true while one is in flight, so callers loop as before. Meanwhile:
- a sequence that sampled in N ends its token_ids with a PLACEHOLDER, so N+1 schedules its next token, whose
  input the runner takes from N's sampled tokens on the device (ScheduledBatch.token_rows);
- a sequence that N finishes (a stop, EOS, an abort) has run in N+1 too: that token is dropped, never emitted.
  One whose max_tokens or context N reaches is known on the host and is not scheduled again;
- blocks of a sequence that a step in flight writes are freed only once that step is seen complete
  (Scheduler.release_blocks): a KV load could otherwise land in them before the device's late write.
A step is finished in the call that launched it (the plain synchronous path) when it asks for logprobs (read
from its logits, which syncs), completes a prefill-only prompt (its KV is sent as soon as step() returns), or
has no sequence that goes on after it (nothing would follow it to overlap with; its final outputs come at once).
The outputs are the same either way.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager, block_hashes
from pdserve.engine.kv_connector import KVConnector, RemoteKV
from pdserve.engine.loader import resolve_model_path
from pdserve.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from pdserve.engine.sampler import logprob_infos, sample_tokens
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.engine.step_log import StepLog
from pdserve.engine.sequence import PLACEHOLDER, Continuation, SamplingParams, Sequence, Status
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.tokenizer import Tokenizer, prompt_ids
from pdserve.errors import InvalidRequest, KVTransferFailed, NoFreeBlocks


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: Optional[str] = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list = field(default_factory=list)
    kv_handle: Optional[bytes] = None  # prefill: where the connector offers the prompt's KV
    kv_num_tokens: int = 0  # prefill: how many prompt tokens that KV covers
    error: Optional[Exception] = None  # the request failed (finished is True)


@dataclass
class _Step:
    """A launched model step: the sequences that sample (row i of `tokens`), their logits and tokens on the
    device; on CUDA under overlap scheduling, `host` (the tokens' copy in pinned memory) and `done` (an event
    recorded after that copy: the step is complete once it has passed)."""
    batch: ScheduledBatch
    seqs: list[Sequence]
    logits: torch.Tensor | None
    tokens: torch.Tensor | None
    host: torch.Tensor | None = None
    done: object = None
    deferred: bool = False  # finished by the next step() call (its sequences hold placeholders meanwhile)
    log: dict | None = None  # its StepLog record, written once the step is seen complete


def resolve_overlap(setting: bool | None, device: torch.device) -> bool:
    """EngineConfig.overlap_schedule: None (auto) is on for CUDA. On CPU the host runs the model itself, so
    nothing would run while it does a step's host half; the path still works there when forced on (tests)."""
    if setting is None:
        return device.type == "cuda"
    if not isinstance(setting, bool):
        raise TypeError(f"overlap_schedule must be true, false or null (auto), got {setting!r}")
    return setting


class LLMEngine:
    def __init__(self, model: str | None = None, dtype: str = "auto", config: EngineConfig | None = None,
                 precision: str = "bf16", enable_prefix_caching: bool = False, max_model_len: int | None = None,
                 progress: bool = True, connector: Optional[KVConnector] = None, remote_kv_timeout: float = 15.0,
                 load_format: str = "auto", role: str = "engine"):
        config = config or EngineConfig()
        self.config = config
        self.precision = precision
        self.model_path = resolve_model_path(model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(dtype, self.device)
        # weights first: a corrupt checkpoint is then reported as such, not as a tokenizer problem
        self.runner = ModelRunner(self.model_path, self.dtype, self.device, config.block_size, config.num_blocks,
                                  config.kv_cache_memory_gb, precision=precision, progress=progress,
                                  max_num_seqs=config.max_num_seqs,
                                  fp8_attention_min_tokens=config.fp8_attention_min_tokens, load_format=load_format)
        self.tokenizer = Tokenizer(self.model_path)
        arch = self.runner.arch
        self.arch = arch
        self.max_model_len = min(max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
        self.eos_token_ids = set(arch.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.prompt_chunk_tokens)
        # may be switched between steps (tests run one engine both ways); a step in flight is finished either way
        self.overlap_schedule = resolve_overlap(config.overlap_schedule, self.device)
        self._in_flight: _Step | None = None  # launched, outputs not yet read (overlap scheduling)
        self.requests: dict[str, Sequence] = {}  # unfinished, plus prefill-only ones holding blocks
        self.num_computed_tokens_total = 0  # tokens whose KV this engine computed (prefix-cache tests)
        # remote KV: requests waiting for room to land it (with a deadline), loads in flight, sends in flight
        self.connector = connector
        self.remote_kv_timeout = remote_kv_timeout
        self.awaiting_room: deque[tuple[Sequence, float]] = deque()
        self.loading: dict[str, Sequence] = {}
        self.sending: dict[str, Sequence] = {}
        self.step_log = StepLog(config.step_log, role, self.device) if config.step_log else None

    @classmethod
    def from_config(cls, config, role: str, progress: bool = False) -> "LLMEngine":
        """The engine of one pool (`role` prefill or decode) of a cluster config."""
        from pdserve.engine.precision import resolve_precision

        econf = config.pool_engine(role)
        precision = resolve_precision(getattr(config, role).precision, role, resolve_device(econf.device))
        return cls(config.model.path, config.model.dtype, econf, precision=precision,
                   enable_prefix_caching=role == "prefill" or config.colocated, max_model_len=config.model.max_model_len,
                   progress=progress, load_format=config.model.load_format,
                   role="colocated" if config.colocated else role)

    # -- input ------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 chat: bool = False) -> list[int]:
        return prompt_ids(self.tokenizer, self.arch.vocab_size, self.max_model_len, prompt, prompt_token_ids, chat)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False, block_table: list[int] | None = None,
                    num_computed_tokens: int = 0, cache_namespace=None, refresh_tokens: int = 0,
                    remote_kv: RemoteKV | None = None, continuation: Continuation | None = None) -> Sequence:
        """Queue a request. `block_table` + `num_computed_tokens`: KV already present in this
        engine's cache (transferred in); the blocks become the sequence's own. `refresh_tokens`:
        recompute the KV of that many first tokens of it (at most num_computed_tokens) in the
        request's first step, in this engine's precision, over what arrived (decode_worker/worker.py).
        `remote_kv`: the prompt's KV is in another engine; the connector loads it into blocks reserved
        here (waiting up to remote_kv_timeout for room), then the request is scheduled.
        `cache_namespace` (a tenant, an adapter) keeps prefix-cache sharing within its namespace.
        One engine has one precision, so precision needs no namespace of its own.
        `continuation`: the request was started by another engine; the prompt ends with its output so far."""
        if remote_kv is not None:
            if self.connector is None:
                raise ValueError("remote_kv needs an engine with a KV connector")
            num_computed_tokens, refresh_tokens = remote_kv.num_tokens, remote_kv.refresh_tokens
        refresh = _refresh_count(refresh_tokens, num_computed_tokens)
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt has {len(prompt_token_ids)} tokens; context is {self.max_model_len}")
        if self.block_manager.blocks_for(len(prompt_token_ids) + 1) > self.block_manager.num_blocks:
            raise NoFreeBlocks(f"prompt of {len(prompt_token_ids)} tokens can never fit this worker's KV pool "
                               f"({self.block_manager.num_blocks} blocks of {self.config.block_size})")
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, prefill_only=prefill_only)
        if block_table is not None:
            seq.block_table = list(block_table)
            seq.num_computed_tokens = seq.num_cached_tokens = num_computed_tokens
            seq.num_refresh_tokens = refresh
        elif self.block_manager.enable_prefix_caching:
            seq.block_hashes = block_hashes(seq.token_ids, self.config.block_size, cache_namespace)
        seq.detok = self._detokenizer(seq, continuation)
        self.requests[request_id] = seq
        if self.step_log is not None:
            self.step_log.request(request_id, len(prompt_token_ids))
        if remote_kv is not None:
            seq.status = Status.WAITING_FOR_REMOTE_KV
            seq.remote_kv = remote_kv
            seq.num_refresh_tokens = refresh
            self.awaiting_room.append((seq, time.monotonic() + self.remote_kv_timeout))
        elif prefill_only and seq.num_pending_tokens <= 0:
            seq.status = Status.FINISHED
            seq.finish_reason = "prefilled"
            if self.connector is not None:  # nothing to send: holds no blocks
                del self.requests[request_id]
        else:
            self.scheduler.add(seq)
        return seq

    def _detokenizer(self, seq: Sequence, cont: Continuation | None) -> IncrementalDetokenizer:
        if cont is None:
            return IncrementalDetokenizer(self.tokenizer, seq.token_ids)
        k = cont.num_output_tokens
        if not 0 < k < seq.num_tokens:
            raise InvalidRequest(f"a continuation of {k} output tokens needs a longer prompt than {seq.num_tokens}")
        detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids[:-k])
        for tok in seq.token_ids[-k:]:  # one by one, as the first engine added them: the same held-back state
            detok.add([tok])
        if not 0 <= cont.num_emitted_chars <= len(detok.text):
            raise InvalidRequest(f"a continuation says {cont.num_emitted_chars} characters were streamed; "
                                 f"its {k} output tokens decode to {len(detok.text)}")
        seq.num_emitted_chars = cont.num_emitted_chars
        return detok

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks, whatever state it is in. Blocks the connector is loading or
        sending are freed once it reports the cancelled transfer over (poll); blocks a model step in flight
        writes, once the next step() sees that step complete. A token it sampled there is never emitted."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        if request_id in self.loading or request_id in self.sending:
            self.connector.cancel(request_id)
        elif seq.status == Status.WAITING_FOR_REMOTE_KV:  # still waiting for room: holds no blocks
            self.awaiting_room = deque(e for e in self.awaiting_room if e[0] is not seq)
        elif seq.status == Status.FINISHED:
            self.scheduler.release_blocks(seq)
        else:
            self.scheduler.finish(seq, "abort")
        return True

    def release(self, request_id: str) -> None:
        """A finished prefill-only request's blocks are no longer needed (transfer done or lease over)."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.release_blocks(seq)

    def reserve_blocks(self, num_tokens: int) -> list[int] | None:
        """Blocks to receive a transferred prompt's KV; None if the pool is short."""
        table: list[int] = []
        return table if self.block_manager.ensure(table, num_tokens) else None

    def free_blocks(self, blocks: list[int]) -> None:
        self.block_manager.release(blocks)

    def score(self, token_ids: list[int], block_table: list[int] | None = None,
              num_computed_tokens: int = 0, refresh_tokens: int = 0, remote_kv: RemoteKV | None = None,
              timeout: float = 30.0):
        """Teacher-forced logits [len(token_ids) - num_computed_tokens, vocab] (row i predicts
        token num_computed_tokens + i + 1), for tokens after a prefix whose KV is already in
        `block_table`, or is loaded from `remote_kv` through the connector first (then freed again);
        `refresh_tokens` as in add_request, in the same forward. Runs alone (call it with no requests
        or transfers in flight); frees its own blocks."""
        from pdserve.engine.scheduler import ScheduledBatch

        if self.has_unfinished() or self.has_transfers():
            raise RuntimeError("score() needs an idle engine")
        if remote_kv is not None:
            blocks = self._load_now(remote_kv, timeout)
            try:
                return self.score(token_ids, blocks, remote_kv.num_tokens, remote_kv.refresh_tokens)
            finally:
                self.free_blocks(blocks)
        own = block_table is None
        if own and num_computed_tokens:
            raise ValueError("num_computed_tokens needs the block_table that holds their KV")
        refresh = _refresh_count(refresh_tokens, num_computed_tokens)
        table = [] if own else list(block_table)
        extra_from = len(table)
        if not self.block_manager.ensure(table, len(token_ids)):
            raise NoFreeBlocks(f"{len(token_ids)} tokens do not fit the KV pool")
        seq = Sequence("score", list(token_ids), len(token_ids), SamplingParams(max_tokens=1))
        seq.block_table, seq.num_computed_tokens = table, num_computed_tokens
        try:
            batch = ScheduledBatch([seq], [len(token_ids) - num_computed_tokens],
                                   num_refresh=[refresh])
            return self.runner.execute(batch, [], all_logits=True)
        finally:
            self.block_manager.release(table if own else table[extra_from:])

    def _load_now(self, remote: RemoteKV, timeout: float) -> list[int]:
        """Blocks holding `remote`'s KV, loaded through the connector while nothing else is in flight."""
        if self.connector is None:
            raise ValueError("remote_kv needs an engine with a KV connector")
        blocks = self.reserve_blocks(remote.num_tokens)
        if blocks is None:
            raise NoFreeBlocks(f"{remote.num_tokens} tokens of KV do not fit the KV pool")
        try:
            self.connector.start_load("score", remote.handle, blocks)
        except BaseException:
            self.free_blocks(blocks)
            raise
        deadline = time.monotonic() + timeout
        while True:
            loaded, failed, _ = self.connector.poll()
            if loaded:
                return blocks
            if failed or time.monotonic() > deadline:
                if not failed:
                    self.connector.cancel("score")  # its blocks stay with the connector: never reused
                    raise RuntimeError(f"KV load did not finish within {timeout:g} s")
                self.free_blocks(blocks)
                raise RuntimeError(f"KV load failed: {failed[0][1]}")
            time.sleep(0.0005)

    def has_unfinished(self) -> bool:
        """step() must keep being called: requests queued or running, or a model step in flight (overlap
        scheduling: its outputs, and frees it holds back, come with the next call)."""
        return self.scheduler.has_work() or bool(self.awaiting_room) or self._in_flight is not None

    def has_transfers(self) -> bool:
        """KV loads or sends in flight: step() or poll_transfers() must keep being called."""
        return bool(self.loading or self.sending)

    def poll_transfers(self) -> list[RequestOutput]:
        """The connector's half of step() alone (no model work): cheap enough for an event loop's thread."""
        return self._transfers() if self.connector is not None else []

    # -- remote KV (the connector's scheduler half) -----------------------------------------------
    def _transfers(self) -> list[RequestOutput]:
        """Start the loads that now have room, then take in what the connector finished."""
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        while self.awaiting_room:
            seq, deadline = self.awaiting_room[0]
            blocks = self.reserve_blocks(seq.remote_kv.num_tokens)
            if blocks is None:
                if now < deadline:
                    break  # first come, first served: later requests wait behind this one
                self.awaiting_room.popleft()
                outputs.append(self._fail(seq, NoFreeBlocks(
                    f"no room for {seq.remote_kv.num_tokens} tokens of KV within {self.remote_kv_timeout:g} s")))
                continue
            self.awaiting_room.popleft()
            seq.block_table = blocks
            try:
                self.connector.start_load(seq.request_id, seq.remote_kv.handle, blocks)
            except Exception as e:  # a bad or expired handle, a peer that is gone
                self.free_blocks(blocks)
                outputs.append(self._fail(seq, KVTransferFailed(
                    f"cannot start the KV transfer for {seq.request_id}: {type(e).__name__}: {e}")))
                continue
            self.loading[seq.request_id] = seq
        if not (self.loading or self.sending):
            return outputs
        loaded, failed, sent = self.connector.poll()
        for rid in loaded:
            seq = self.loading.pop(rid)
            if self.requests.get(rid) is not seq:  # aborted while loading
                self.free_blocks(seq.block_table)
                continue
            seq.num_computed_tokens = seq.num_cached_tokens = seq.remote_kv.num_tokens
            seq.status = Status.WAITING
            self.scheduler.add(seq)
            if self.step_log is not None:
                self.step_log.loaded(rid)
        for rid, why in failed:
            seq = self.loading.pop(rid)
            self.free_blocks(seq.block_table)
            if self.requests.get(rid) is seq:
                outputs.append(self._fail(seq, KVTransferFailed(f"KV transfer for {rid} failed: {why}")))
        for rid in sent:
            seq = self.sending.pop(rid, None)
            if seq is not None:
                self.scheduler.release_blocks(seq)
                if self.requests.get(rid) is seq:
                    del self.requests[rid]
        return outputs

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        self.requests.pop(seq.request_id, None)
        seq.status = Status.FINISHED
        return RequestOutput(seq.request_id, [], "", True, None, seq.num_prompt_tokens, error=error)

    def _send(self, seq: Sequence) -> RequestOutput:
        """A prefill-only request is done: its KV goes to the connector, the blocks stay held until sent."""
        n = seq.num_computed_tokens
        out = RequestOutput(seq.request_id, [], "", True, "prefilled", seq.num_prompt_tokens, 0, seq.num_cached_tokens,
                            kv_num_tokens=n)
        if self.connector is None:  # the caller takes the blocks and calls release()
            return out
        if n == 0:
            self.release(seq.request_id)
            return out
        try:
            out.kv_handle = self.connector.save(seq.request_id, seq.block_table[:self.block_manager.blocks_for(n)], n)
        except Exception as e:  # e.g. the fp8 staging pool is full
            self.release(seq.request_id)
            return self._fail(seq, e)
        self.sending[seq.request_id] = seq
        return out

    # -- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one model step; return the outputs of the steps finished in this call: this
        one, or under overlap scheduling the one launched by the previous call (module docstring)."""
        outputs = self.poll_transfers()
        batch = self.scheduler.schedule()
        prev, self._in_flight = self._in_flight, None
        try:
            cur = self._launch(batch, prev) if batch else None
            if prev is not None:  # read only now: the device already has the next step queued behind it
                outputs += self._finish(prev)
            if cur is not None:
                if self._may_defer(cur):
                    self._defer(cur)
                    self._in_flight = cur
                else:
                    outputs += self._finish(cur)
        except BaseException:
            self._abandon(prev, batch)
            raise
        finally:
            self.scheduler.release_deferred()
        return outputs

    def _launch(self, batch: ScheduledBatch, prev: _Step | None) -> _Step:
        """Queue the model step and its sampling on the device; nothing here waits for the device."""
        sample_rows = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new))
                       if not s.prefill_only and s.num_computed_tokens + n == s.num_tokens]
        if prev is not None:
            batch.token_rows = [(i, s.in_flight_row) for i, s in enumerate(batch.seqs) if s.in_flight_row is not None]
            batch.token_source = prev.tokens
        log = self.step_log.launching(batch) if self.step_log is not None else None
        logits = self.runner.execute(batch, sample_rows)
        for seq, n, r in zip(batch.seqs, batch.num_new, batch.num_refresh):
            seq.num_computed_tokens += n
            seq.num_refresh_tokens -= r  # done: a refresh runs once
            self.num_computed_tokens_total += n + r
            self._cache_full_blocks(seq)
            seq.num_steps_in_flight += 1
        seqs = [batch.seqs[i] for i in sample_rows]
        # positions: each row's num_tokens, placeholders included, is the index its new token takes
        tokens = sample_tokens(logits, seqs) if logits is not None else None
        step = _Step(batch, seqs, logits, tokens, log=log)
        if log is not None:
            self.step_log.launched(log)
        if self.overlap_schedule and self.device.type == "cuda":
            if tokens is not None:
                step.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                step.host.copy_(tokens, non_blocking=True)
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def _may_defer(self, step: _Step) -> bool:
        if not self.overlap_schedule:
            return False
        if any(s.prefill_only and s.num_pending_tokens == 0 for s in step.batch.seqs):
            return False  # a prompt done: its KV goes to the connector as soon as the step is over
        if any(s.params.logprobs is not None for s in step.seqs):
            return False  # read from the logits, which syncs (and a graph's are overwritten by the next replay)
        if len(step.seqs) < len(step.batch.seqs):
            return True  # a prompt chunk: that sequence goes on
        return any(not s.finished and s.num_output_tokens + 1 < s.params.max_tokens
                   and s.num_tokens + 1 < self.max_model_len for s in step.seqs)

    def _defer(self, step: _Step) -> None:
        """The step's tokens are read in the next step() call; its sequences hold placeholders meanwhile."""
        step.deferred = True
        step.logits = None  # no logprobs here; [rows, vocab] float32 need not live a step longer
        for row, seq in enumerate(step.seqs):
            if seq.finished:
                continue  # ended at the previous step's token: this one is dropped
            seq.token_ids.append(PLACEHOLDER)
            seq.in_flight_row = row
            seq.last_token_in_flight = (seq.num_output_tokens >= seq.params.max_tokens
                                        or seq.num_tokens >= self.max_model_len)

    def _finish(self, step: _Step) -> list[RequestOutput]:
        """The host half of a launched step: wait for its tokens, then stop checks, text and outputs."""
        if step.done is not None:
            step.done.synchronize()
        if step.log is not None:
            self.step_log.finished(step.log)
        for seq in step.batch.seqs:
            seq.num_steps_in_flight -= 1
        outputs = []
        if step.tokens is not None:
            tokens = (step.tokens if step.host is None else step.host).tolist()
            infos = [None] * len(tokens) if step.deferred else logprob_infos(step.logits, step.seqs, step.tokens)
            for seq, tok, info in zip(step.seqs, tokens, infos):
                if seq.in_flight_row is not None:
                    seq.token_ids.pop()  # the placeholder; _append_token puts the token there
                    seq.in_flight_row = None
                    seq.last_token_in_flight = False
                if seq.finished:
                    continue  # it ended at an earlier token or was aborted: this token never existed
                outputs.append(self._append_token(seq, tok, info))
        for seq in step.batch.seqs:
            if seq.prefill_only and seq.num_pending_tokens == 0 and not seq.finished:
                self.scheduler.finish(seq, "prefilled", keep_blocks=True)
                outputs.append(self._send(seq))
        return outputs

    def _abandon(self, prev: _Step | None, batch: ScheduledBatch) -> None:
        """A step() failed: forget the steps it held (the one in flight and this one), so no sequence keeps a
        placeholder or holds back its frees (the caller fails or aborts the requests; engine/async_engine.py)."""
        if self.device.type == "cuda":
            # let what was queued finish before its blocks can be freed; a failed device writes nothing more
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        for seq in (prev.batch.seqs if prev is not None else []) + batch.seqs:
            seq.num_steps_in_flight = 0
            if seq.in_flight_row is not None:
                seq.token_ids.pop()
                seq.in_flight_row = None
                seq.last_token_in_flight = False

    def _cache_full_blocks(self, seq: Sequence) -> None:
        if not seq.block_hashes:
            return
        full = min(seq.num_computed_tokens // self.config.block_size, len(seq.block_hashes))
        for i in range(seq.num_hashed_blocks, full):
            self.block_manager.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_hashed_blocks = full

    def _append_token(self, seq: Sequence, tok: int, info) -> RequestOutput:
        seq.token_ids.append(tok)
        if info is not None:
            seq.logprobs.append(info)
        p = seq.params
        seq.detok.add([tok])
        reason = None
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            reason = "stop"
        elif p.stop and self._match_stop(seq):
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if seq.stop_text_len is None:
                seq.detok.flush()
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
        text = self._visible_text(seq)
        new_text = text[seq.num_emitted_chars:]
        seq.num_emitted_chars = len(text)
        return RequestOutput(seq.request_id, [tok], new_text, reason is not None, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_tokens, [info] if info else [])

    def _match_stop(self, seq: Sequence) -> bool:
        text = seq.detok.text
        longest = max(len(s) for s in seq.params.stop)
        window_start = max(0, seq.num_emitted_chars - longest)
        hits = [i for i in (text.find(s, window_start) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.stop_text_len = min(hits)
            return True
        return False

    def _visible_text(self, seq: Sequence) -> str:
        """Text that may be streamed now: while running, a tail that could still grow into a stop
        string is held back, so a stop string never reaches the client."""
        text = seq.detok.text
        if seq.stop_text_len is not None:
            return text[:seq.stop_text_len]
        if seq.finished or not seq.params.stop:
            return text
        hold = max(len(s) for s in seq.params.stop) - 1
        return text[:max(len(text) - hold, seq.num_emitted_chars)]

    # -- offline ----------------------------------------------------------------------------------
    def prefill(self, token_ids: list[int], request_id: str = "prefill") -> RemoteKV:
        """Run one prompt's prefill to completion and save its KV (all tokens but the last) through the
        connector, as a prefill worker does; another engine loads it with add_request/score(remote_kv=...)."""
        if self.connector is None:
            raise ValueError("prefill() saves through the KV connector; this engine has none")
        self.add_request(request_id, token_ids, SamplingParams(max_tokens=1), prefill_only=True)
        out = None
        while self.has_unfinished():
            for o in self.step():
                if o.request_id == request_id:
                    out = o
        self.poll_transfers()  # an in-process save is over at once: its blocks are free again now
        if out is None or out.error is not None or out.kv_handle is None:
            raise RuntimeError(f"prefill of {len(token_ids)} tokens saved no KV"
                               + (f": {out.error}" if out is not None and out.error is not None else ""))
        return RemoteKV(out.kv_handle, out.kv_num_tokens)

    def generate(self, requests: Iterable[tuple[list[int], SamplingParams]], on_output=None) -> list[dict]:
        """Run requests to completion, batched; results in input order. `on_output(index, output)`
        sees every delta as it is produced."""
        ids = []
        for i, (token_ids, params) in enumerate(requests):
            rid = f"gen-{i}-{time.monotonic_ns()}"
            self.add_request(rid, token_ids, params)
            ids.append(rid)
        index = {rid: i for i, rid in enumerate(ids)}
        results = [{"prompt_token_ids": list(self.requests[rid].token_ids), "token_ids": [], "text": "",
                     "finish_reason": None} for rid in ids]
        pending = set(ids)
        while pending:
            for out in self.step():
                i = index.get(out.request_id)
                if i is None:
                    continue
                r = results[i]
                r["token_ids"].extend(out.new_token_ids)
                r["text"] += out.new_text
                if out.new_logprobs:
                    r.setdefault("logprobs", []).extend(out.new_logprobs)
                if on_output is not None:
                    on_output(i, out)
                if out.finished:
                    r["finish_reason"] = out.finish_reason
                    r["usage"] = {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
                                  "cached_tokens": out.num_cached_tokens}
                    pending.discard(out.request_id)
        return results


def _refresh_count(refresh_tokens: int, num_computed_tokens: int) -> int:
    """How many first tokens to recompute: at most the ones whose KV arrived."""
    if refresh_tokens < 0:
        raise ValueError(f"refresh_tokens must be >= 0, got {refresh_tokens}")
    return min(refresh_tokens, num_computed_tokens)
