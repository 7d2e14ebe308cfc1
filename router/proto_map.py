"""Between the public protobuf API and the router's own types: sampling settings in, responses and
cluster views out, and every error's gRPC status code (the one place they are decided).
"""
from __future__ import annotations

import grpc

from pdserve.config import Config
from pdserve.engine.sequence import SamplingParams
from pdserve.errors import InvalidRequest, NoFreeBlocks, NoReadyWorker
from pdserve.proto import pb
from pdserve.router.dispatch import Delta, WorkerFailed, cause_of


def sampling_from_proto(s) -> SamplingParams:
    kw = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "logprobs"):
        if s.HasField(name):
            kw[name] = getattr(s, name)
    if kw.get("seed") is not None and kw["seed"] >= 2**63:
        raise InvalidRequest("seed must be < 2^63")
    return SamplingParams(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, **kw)


def response(rid: str, delta: Delta, prompt_token_ids: list[int]) -> pb.GenerateResponse:
    """The first response also names the workers and echoes the prompt; the last carries finish_reason and usage."""
    d = delta.decode
    resp = pb.GenerateResponse(request_id=rid, token_ids=d.token_ids, text=d.text)
    for lp, top in d.logprobs:
        resp.logprobs.add(logprob=lp, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])
    if delta.workers is not None:
        resp.prefill_worker, resp.decode_worker = delta.workers
        resp.prompt_token_ids.extend(prompt_token_ids)
    if d.finished:
        resp.finish_reason = d.finish_reason.value
        resp.usage.CopyFrom(pb.Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                                     cached_tokens=d.cached_tokens))
    return resp


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed request ends with."""
    cause = cause_of(exc)
    if isinstance(cause, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, NoFreeBlocks):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause)
    if isinstance(cause, (NoReadyWorker, WorkerFailed)):
        return grpc.StatusCode.UNAVAILABLE, str(cause)
    # by name, to keep Ray out of this module: RayActorError, ActorDiedError, ActorUnavailableError; their text
    # (actor ids, pids, addresses) is for the log, not for clients
    if "Actor" in type(exc).__name__:
        return grpc.StatusCode.UNAVAILABLE, "a worker serving the request is gone"
    return grpc.StatusCode.INTERNAL, f"{type(cause).__name__}: {cause}"


def model_info(config: Config, arch, model_path: str, max_model_len: int, pools: dict) -> pb.ModelInfo:
    # a running worker's precision is the truth; the config's is what a worker would start with
    precisions = {r: next((w.info.get("precision") for w in p.ready()), getattr(config, r).precision)
                  for r, p in pools.items()}
    return pb.ModelInfo(model=model_path, architecture=arch.model_type, vocab_size=arch.vocab_size,
                        max_model_len=max_model_len, num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                        prefill_precision=precisions["prefill"], decode_precision=precisions["decode"],
                        kv_transfer_dtype=config.kv_transfer.dtype, block_size=config.engine.block_size,
                        eos_token_ids=sorted(arch.eos_token_ids))


def cluster_info(pools: dict) -> pb.ClusterInfo:
    info = pb.ClusterInfo(prefill_replicas=len(pools["prefill"].active()),
                          decode_replicas=len(pools["decode"].active()),
                          prefill_ready=len(pools["prefill"].ready()), decode_ready=len(pools["decode"].ready()))
    for p in pools.values():
        for w in p.workers.values():
            s = w.stats
            info.workers.add(name=w.name, role=w.role, state=w.state.value, num_waiting=s.get("num_waiting", 0),
                             num_running=s.get("num_running", 0), kv_cache_usage=s.get("kv_cache_usage", 0.0),
                             num_free_blocks=s.get("num_free_blocks", 0), inflight=w.inflight,
                             pid=w.info.get("pid", 0))
    return info
