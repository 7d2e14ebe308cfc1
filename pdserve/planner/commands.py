"""`pdserve profile` and `pdserve plan`: their arguments (registered by pdserve/commands.py) and what they run.
Only argparse is imported when the parser is built; the planner's modules load when a command runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure a planner profile (prefill, decode, KV transfer times) on this machine",
                       description="Measure the step times of the model's engine (CUDA when present, else CPU) and "
                                   "its KV transfer, and write the profile JSON that `pdserve plan` reads.")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights of the checkpoint's shapes (a directory of config.json + tokenizer)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    p.add_argument("--precisions", default="bf16", help="prefill precisions to measure, e.g. bf16,fp8")
    p.add_argument("--decode-precisions", default="bf16", help="decode precisions to measure (of --precisions)")
    p.add_argument("--prefill-tokens", default="16,32,64,128,256,512")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--contexts", default="64,512", help="two decode contexts (tokens), low and high")
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--distinct-prompts", action="store_true",
                   help="decode: every sequence its own prompt (default: one shared through the prefix cache, "
                        "cheap to set up on a CPU; on a GPU shared blocks may be read from L2)")
    p.add_argument("--transfer-tokens", default="16,128,512,2048", help="empty: no transfer curves")
    p.add_argument("--transfer-placement", choices=["adjacent", "scattered"], default="adjacent",
                   help="block ids of the measured transfers: adjacent on both sides (one NIXL descriptor, what "
                        "the block manager mostly gives) or every other block (one descriptor per block)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU: intra-op threads of the engine (a Ray actor's 1)")
    p.add_argument("--host-cores", type=int, default=None,
                   help="CPU: the cores the cluster's engines will share (recorded for the simulator)")
    p.add_argument("--host-contention", type=int, default=0, metavar="K",
                   help="CPU: also measure how much slower engines step when 1..K of them step at once on this box "
                        "(K processes; pdserve/planner/contention.py), for the simulator's sharing of --host-cores")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--server", default=None, help="HOST:PORT of a running cluster: also measure its fixed overheads")
    p.add_argument("--overhead-prompt-tokens", type=int, default=128)
    p.add_argument("--overhead-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_profile)

    q = sub.add_parser("plan", help="simulate a cluster: goodput under TTFT/TPOT SLOs, best P:D split, vs colocated",
                       description="Discrete-event simulation of the router, prefill pool, KV transfer and decode pool "
                                   "(or colocated engines) from a profile. With --gpus: every P:D split and colocated "
                                   "at that GPU count, the highest rate meeting the SLOs for each, the best split. "
                                   "With --prefill/--decode (or --colocated) and --rate: one run's percentiles.")
    q.add_argument("--profile", required=True,
                   help="profile JSON, or a shipped one: cpu-smollm2, h100-llama3-8b, h200-llama3-8b, h200-llama3-8b-derived")
    q.add_argument("--workload", required=True, help="YAML file or a preset: chat, short, rag, code, conversation")
    q.add_argument("--slo", required=True, help="ttft=SECONDS,tpot=SECONDS[,attainment=0.9] (200ms also works)")
    q.add_argument("--gpus", type=int, default=None, help="plan this many GPUs: every split and colocated")
    q.add_argument("--prefill", type=int, default=None, help="one deployment: prefill replicas")
    q.add_argument("--decode", type=int, default=None, help="one deployment: decode replicas")
    q.add_argument("--colocated", type=int, default=None, help="one deployment: this many colocated engines")
    q.add_argument("--rate", type=float, default=None, help="requests/s (one deployment); default: search the max")
    q.add_argument("--duration", type=float, default=30.0,
                   help="seconds of arrivals per simulated run (the first 20%% warm the cluster up, uncounted)")
    q.add_argument("--num-requests", type=int, default=None, help="simulated requests per run instead of --duration")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--prefill-precision", default="bf16")
    q.add_argument("--decode-precision", default="bf16")
    q.add_argument("--colocated-precision", default="bf16")
    q.add_argument("--wire", choices=["raw", "fp8"], default="raw", help="KV on the wire")
    q.add_argument("--refresh-sink-tokens", type=int, default=4)
    q.add_argument("--policy", choices=["cache_aware", "least_loaded", "round_robin"], default="cache_aware")
    q.add_argument("--max-num-seqs", type=int, default=None)
    q.add_argument("--max-num-batched-tokens", type=int, default=None, help="decode/colocated step budget")
    q.add_argument("--prefill-max-num-batched-tokens", type=int, default=None)
    q.add_argument("--kv-cache-tokens", type=int, default=None, help="KV capacity of one decode/colocated engine")
    q.add_argument("--transfer-scale", type=float, default=1.0, help="KV transfer times x this (another network)")
    q.add_argument("--host-cores", type=int, default=None,
                   help="engines share this many cores (default: the profile's)")
    q.add_argument("--out", default=None, help="folder for plan.json, plan.md, plan.png and helm-values.yaml")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_plan)


def cmd_profile(args) -> int:
    from pdserve.errors import EXIT_MODEL, CLIError
    from pdserve.planner.measure import measure

    if args.repeats < 1 or args.decode_steps < 2 or args.threads < 1:
        raise CLIError("--repeats >= 1, --decode-steps >= 2 and --threads >= 1, please")
    try:
        for name in ("prefill_tokens", "batches", "contexts", "transfer_tokens"):
            v = getattr(args, name)
            vals = [int(x) for x in v.split(",")] if v else []
            if any(x < 1 for x in vals) or vals != sorted(set(vals)) or (name != "transfer_tokens" and not vals):
                raise ValueError
        if len(args.contexts.split(",")) != 2:
            raise CLIError("--contexts takes two values, low and high")
    except ValueError:
        raise CLIError(f"--{name.replace('_', '-')} must be increasing positive integers, comma-separated") from None
    try:
        prof = measure(args)
    except ImportError as e:
        raise CLIError(f"a module the measurement needs is missing: {e} (the KV transfer needs the cluster extra; "
                       "--transfer-tokens '' skips it)") from None
    except (OSError, RuntimeError, ValueError) as e:
        from pdserve.errors import ModelLoadError
        raise CLIError(str(e), EXIT_MODEL if isinstance(e, ModelLoadError) else 2) from None
    Path(args.out).write_text(json.dumps(prof, indent=1) + "\n")
    print(f"pdserve profile: wrote {args.out}", file=sys.stderr)
    return 0


def _spec(args, profile):
    from pdserve.planner.sim import ClusterSpec

    return ClusterSpec.from_profile(
        profile, prefill_precision=args.prefill_precision, decode_precision=args.decode_precision, wire=args.wire,
        refresh_sink_tokens=args.refresh_sink_tokens, policy=args.policy, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_max_num_batched_tokens=args.prefill_max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens,
        transfer_scale=args.transfer_scale, host_cores=args.host_cores)


def cmd_plan(args) -> int:
    import dataclasses

    import yaml

    from pdserve.errors import CLIError
    from pdserve.planner import plan, profile, report, workload

    try:
        prof = profile.resolve(args.profile)
        wl = workload.resolve(args.workload)
        slo = plan.parse_slo(args.slo)
    except ValueError as e:
        raise CLIError(str(e)) from None
    one = args.prefill is not None or args.decode is not None or args.colocated is not None
    if one == (args.gpus is not None):
        raise CLIError("give --gpus N (plan every split) or one deployment (--prefill P --decode D, or --colocated N)")
    for name in ("gpus", "prefill", "decode", "colocated", "num_requests"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.rate is not None and not args.rate > 0:
        raise CLIError(f"--rate must be > 0, got {args.rate}")
    if not args.duration > 0:
        raise CLIError("--duration must be > 0 seconds")
    if not args.transfer_scale > 0:
        raise CLIError("--transfer-scale must be > 0")
    base = _spec(args, prof)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    title = f"{wl.name} on {Path(args.profile).stem}, SLO {args.slo}"
    try:
        if one:
            if args.colocated is not None and (args.prefill is not None or args.decode is not None):
                raise CLIError("--colocated N is a deployment of its own; leave out --prefill/--decode")
            if args.colocated is not None:
                spec = dataclasses.replace(base, prefill=0, decode=args.colocated, colocated=True,
                                           decode_precision=args.colocated_precision)
            elif args.prefill is None or args.decode is None:
                raise CLIError("a disaggregated deployment needs both --prefill and --decode")
            else:
                spec = dataclasses.replace(base, prefill=args.prefill, decode=args.decode)
            if args.rate is not None:
                rep = plan.run_at(prof, spec, wl, args.rate, args.num_requests, args.seed, slo, args.duration)
            else:
                rate, rep = plan.max_goodput(prof, spec, wl, slo, args.num_requests, args.seed,
                                             duration=args.duration)
                if rep is None:
                    raise CLIError(f"{spec.label()} meets the SLOs at no rate (not even 0.001 req/s)")
            result = {"deployment": spec.label(), "report": rep}
            text = report.run_table(rep, spec.label())
        else:
            def progress(row):
                print(f"  {row['label']:<16} max goodput {row['max_goodput']:.3g} req/s", file=sys.stderr, flush=True)

            result = plan.plan(prof, wl, args.gpus, slo, n=args.num_requests, seed=args.seed, base=base,
                               colocated_precision=args.colocated_precision, progress=progress,
                               duration=args.duration)
            text = report.plan_table(result)
            result["helm_values"] = plan.helm_values(result["best"], base, slo)
            result["autoscaling"] = plan.autoscaling_config(result["best"])
    except ValueError as e:  # a precision or wire the profile lacks
        raise CLIError(str(e)) from None
    result["profile_source"] = prof.source
    result["workload"] = {"name": wl.name, "source": wl.source}
    if out:
        (out / "plan.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out / "plan.md").write_text(f"# {title}\n\nprofile: {prof.source}\n\n"
                                     + (report.plan_table(result, markdown=True) if not one else text) + "\n")
        if not one:
            (out / "helm-values.yaml").write_text(
                f"# pdserve plan: {title}\n# profile: {prof.source}\n" + yaml.safe_dump(result["helm_values"],
                                                                                        sort_keys=False))
            try:
                report.plot(result, out / "plan.png", title)
            except ImportError:
                print("pdserve plan: no matplotlib here, so no plan.png (pip install matplotlib)", file=sys.stderr)
    print(json.dumps(result, default=str) if args.json else text)
    return 0
