"""What a py-spy raw profile (`py-spy record -f raw`, as benchmarks/bench_cluster_gpu.py --pyspy writes) spent
its samples on: the functions with the most samples of their own and with the most including their callees, per
thread, as shares of that thread's samples.

    python benchmarks/pyspy_top.py pyspy-colocated-c256-router.txt [--top 25] [--thread MainThread]
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict


def load(path: str) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks by thread: [(frames outermost first, samples)]. py-spy's raw lines are `thread;frame;...;frame N`
    where the first field names the thread ("process 12 ..." or "thread (0x..)")."""
    out: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or " " not in line:
                continue
            stack, n = line.rsplit(" ", 1)
            frames = stack.split(";")
            thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
            out[thread].append((frames[1:] if thread != "?" else frames, int(n)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", default=None, help="only threads whose name contains this")
    args = p.parse_args()
    threads = load(args.path)
    grand = sum(n for stacks in threads.values() for _, n in stacks)
    for thread, stacks in sorted(threads.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        if args.thread and args.thread not in thread:
            continue
        total = sum(n for _, n in stacks)
        if total < 0.02 * grand:
            continue
        own, incl = Counter(), Counter()
        for frames, n in stacks:
            own[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
        print(f"== {thread}: {total} samples ({total / grand:.0%} of all)")
        print("  own:")
        for fr, n in own.most_common(args.top):
            print(f"    {n / total:6.1%}  {fr}")
        print("  including callees:")
        for fr, n in incl.most_common(args.top):
            print(f"    {n / total:6.1%}  {fr}")


if __name__ == "__main__":
    main()
