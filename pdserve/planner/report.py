"""Tables and plots of `pdserve plan`."""
from __future__ import annotations

from pathlib import Path


def _ms(s: dict | None, key: str) -> str:
    return "-" if s is None else f"{s[key] * 1e3:.0f}"


def run_table(rep: dict, label: str) -> str:
    g = rep["goodput"]
    lines = [f"{label}: offered {rep['rate']:.3g} req/s, {rep['completed']} of {rep['num_requests']} completed, "
             f"SLO attainment {rep['attainment']:.1%} (TTFT <= {g['ttft_s']} s, TPOT <= {g['tpot_s']} s), "
             f"goodput {rep['goodput_at_rate']:.3g} req/s",
             f"{'':<6}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}   (ms)"]
    for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
        s = rep[key]
        lines.append(f"{name:<6}" + "".join(f"{_ms(s, k):>9}" for k in ("mean", "p50", "p90", "p99")))
    if rep["prefix_hit_rate"]:
        lines.append(f"prefix hit rate {rep['prefix_hit_rate']:.1%}")
    return "\n".join(lines)


def plan_table(result: dict, markdown: bool = False) -> str:
    head = ("deployment", "GPUs", "max goodput req/s", "per GPU", "TTFT p50/p90 ms", "TPOT p50/p90 ms")
    rows = []
    for r in result["rows"]:
        rep = r["report"]
        lat = ("-", "-") if rep is None else (
            f"{_ms(rep['ttft_s'], 'p50')}/{_ms(rep['ttft_s'], 'p90')}",
            f"{_ms(rep['tpot_s'], 'p50')}/{_ms(rep['tpot_s'], 'p90')}")
        mark = " *" if r is result["best"] else ""
        rows.append((r["label"] + mark, str(r["gpus"]), f"{r['max_goodput']:.3g}", f"{r['per_gpu']:.3g}", *lat))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        w = [max(len(x) for x in col) for col in zip(head, *rows)]
        out = ["  ".join(x.ljust(n) for x, n in zip(head, w))]
        out += ["  ".join(x.ljust(n) for x, n in zip(row, w)) for row in rows]
    best, ratio = result["best"], result["ratio_vs_colocated"]
    out.append("")
    out.append(f"best split: {best['label']} ({best['max_goodput']:.3g} req/s); colocated: "
               f"{result['colocated']['max_goodput']:.3g} req/s; disaggregated / colocated = "
               + ("-" if ratio is None else f"{ratio:.2f}x"))
    return "\n".join(out)


def plot(result: dict, path: Path, title: str) -> None:
    """Max goodput per deployment, and the latency percentiles at that rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"].replace("colocated x", "coloc\nx") for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:gray" if r["colocated"] else ("tab:green" if r is result["best"] else "tab:blue") for r in rows]
    a.bar(range(len(rows)), [r["max_goodput"] for r in rows], color=colors)
    a.set_xticks(range(len(rows)), labels, rotation=60, fontsize=8)
    a.set_ylabel("max goodput (req/s at SLO attainment)")
    a.set_title("goodput by deployment (green: best split, gray: colocated)")
    for key, style, name in (("ttft_s", "o-", "TTFT"), ("tpot_s", "s--", "TPOT")):
        for q in ("p50", "p90"):
            ys = [r["report"][key][q] * 1e3 if r["report"] and r["report"][key] else float("nan") for r in rows]
            b.plot(range(len(rows)), ys, style, label=f"{name} {q}", alpha=0.9 if q == "p90" else 0.5)
    b.set_yscale("log")
    b.set_xticks(range(len(rows)), labels, rotation=60, fontsize=8)
    b.set_ylabel("ms, at each deployment's max goodput")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
