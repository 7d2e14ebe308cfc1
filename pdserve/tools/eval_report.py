"""What `pdserve eval` writes: a markdown table (with the command, machine and date), the JSON
result, and a PNG plot; plus the issue-4 claims checked on whatever configurations were run."""
from __future__ import annotations

import json
from pathlib import Path

from pdserve.tools import eval_text


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table(result: dict) -> str:
    s = result["settings"]
    b = result["baseline"]
    head = ("| prefill / decode / KV wire | KL cont. | top-1 cont. | near-ties among misses | KL text | "
            "ppl | Δppl | flip rate | first flip at |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| baseline (unquantized {result['dtype']}, no transfer) | 0 | 100% | – | 0 | "
            f"{_fmt(b['ppl'], '.3f')} | – | 0/{b['prompts']} | – |"]
    for c in result["configs"]:
        cont, text, g = c["continuation"], c["text"], c["greedy"]
        miss = cont["disagreements"]
        near = "–" if cont["near_tie_fraction"] is None else \
            f"{round(cont['near_tie_fraction'] * miss)}/{miss}"
        flips = "–" if g["flip_rate"] is None else f"{g['flips']}/{g['prompts']} ({_pct(g['flip_rate'])})"
        delta = "–" if text["ppl_delta_pct"] is None else f"{text['ppl_delta_pct']:+.2f}%"
        rows.append(f"| {c['prefill']} / {c['decode']} / {c['kv_wire']} | {_fmt(cont['kl'], '.2e')} | "
                    f"{_pct(cont['top1'])} | {near} | {_fmt(text['kl'], '.2e')} | {_fmt(text['ppl'], '.3f')} | "
                    f"{delta} | {flips} | {_median_token(g['first_divergence'])} |")
    notes = [f"KL: mean KL(baseline ‖ config) per token, nats. cont.: {b['continuation_tokens']} tokens of the "
             f"baseline's greedy continuations of {b['prompts']} prompt{'s' if b['prompts'] != 1 else ''} (≤ {s['max_tokens']} tokens, EOS stops), "
             f"teacher-forced. near-ties: disagreements where the baseline's top-2 logits are < "
             f"{s['near_tie_logits']} apart."]
    if s["text"]:
        notes.append(f"text / ppl: {s['ppl_windows']} window{'s' if s['ppl_windows'] > 1 else ''} of {s['text']['title']}: {s['ppl_prefix']} tokens "
                     f"prefilled at P, the next {s['ppl_tokens']} scored at D ({b['text_tokens']} tokens).")
    if s.get("refresh_sink_tokens"):
        notes.append(f"sink refresh: where the KV is not the decode side's own (fp8 wire or P ≠ D), decode "
                     f"recomputes the first {s['refresh_sink_tokens']} prompt tokens (attention sinks) in its "
                     f"first step, as a decode worker does (kv_transfer.refresh_sink_tokens).")
    if "fp8_attention_min_tokens" in s:
        n = s["fp8_attention_min_tokens"]
        where = "every prompt step" if n <= 1 else f"prompt chunks of at least {n} tokens"
        notes.append(f"fp8 attention: engines at fp8 ran attention's two matmuls on e4m3 operands on {where} "
                     f"(engine.fp8_attention_min_tokens), bf16/float32 attention elsewhere.")
    notes.append("flip rate: greedy generations (same prompts, from transferred KV) that differ from the "
                 "baseline's in any token; first flip at: median index of the first differing output token "
                 "among the flipped ones (0 = the first token, computed at the decode precision).")
    return "\n".join([head, *rows, "", *notes])


def _median_token(positions: list) -> str:
    return "–" if not positions else f"token {sorted(positions)[len(positions) // 2]}"


def claims(result: dict) -> list[str]:
    """Issue 4's Done-when relations, for the configurations present."""
    by = {c["config"]: c for c in result["configs"]}
    out = []
    for wire in ("bf16", "fp8"):
        pa, un = by.get(f"nvfp4/bf16/{wire}"), by.get(f"nvfp4/nvfp4/{wire}")
        if pa and un:
            for what, key in (("KL cont.", ("continuation", "kl")), ("KL text", ("text", "kl")),
                              ("Δppl %", ("text", "ppl_delta_pct"))):
                a, u = pa[key[0]][key[1]], un[key[0]][key[1]]
                if a is None or u is None:
                    continue
                ok = abs(a) < abs(u)
                ratio = f", {abs(u) / abs(a):.1f}x less" if ok and a else ""
                out.append(f"{'holds' if ok else 'FAILS'}: nvfp4/bf16 degrades less than nvfp4/nvfp4 "
                           f"({wire} wire) on {what}: {a:.3g} vs {u:.3g}{ratio}")
        fp8 = by.get(f"fp8/bf16/{wire}")
        if fp8 and fp8["text"]["ppl_delta_pct"] is not None:
            d = fp8["text"]["ppl_delta_pct"]
            out.append(f"{'holds' if abs(d) <= 2 else 'FAILS'}: fp8/bf16 ({wire} wire) perplexity within 2% "
                       f"of the baseline: {d:+.2f}%")
    exact = by.get("bf16/bf16/bf16")
    if exact:
        c = exact["continuation"]
        measured = (f"KL {_fmt(c['kl'], '.1e')}, KL text {_fmt(exact['text']['kl'], '.1e')}, "
                    f"top-1 {_pct(c['top1'])}, flips {exact['greedy']['flips']}")
        if result.get("dtype", "float32") == "float32":
            ok = c["disagreements"] == 0 and (c["kl"] or 0) < 1e-6 and not exact["greedy"]["flips"]
            out.append(f"{'holds' if ok else 'FAILS'}: bf16/bf16 with the bf16 wire reproduces the baseline "
                       f"({measured})")
        else:  # the split runs other batch shapes than the baseline, and low-precision GEMMs round by shape
            out.append(f"noise floor, not an exactness check ({result['dtype']} compute): bf16/bf16 with the bf16 "
                       f"wire against the baseline: {measured}")
    return out


def markdown(result: dict) -> str:
    lines = [table(result)]
    checks = claims(result)
    if checks:
        lines += ["", "Checks (issue 4):", *[f"- {c}" for c in checks]]
    return "\n".join(lines)


def document(result: dict) -> str:
    return "\n".join([
        "# Accuracy of phase-aware precision (`pdserve eval`)", "",
        f"Model `{Path(result['model']).name}`, engines in {result['dtype']} on {result['device']}; "
        f"{result['date']}.", "",
        "```", result.get("command", "pdserve eval"), "```", "",
        markdown(result), "",
        *_provenance(result),
        "![KL, perplexity change and flip rate per configuration](eval.png)", "",
    ])


def _provenance(result: dict) -> list[str]:
    text = result["settings"]["text"]
    if not text:
        return []
    lines = [f"Perplexity text: {text['title']}, {text['tokens']} tokens, read from "
             f"`{text['source'].replace(str(Path.home()), '~')}`."]
    if text["source"].endswith(eval_text.MEMBER):
        lines.append(f"It ships in PyPI's Brotli 1.2.1 source distribution; fetch it with "
                     f"`{eval_text.INSTALL.format(dir='$HOME/.cache/pdserve/eval-text')}`.")
    return [*lines, ""]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    names = [c["config"] for c in configs]
    y = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(names) + 1.8), sharey=True)
    floor = 1e-9  # log axis: an exact configuration's KL of 0 is drawn at the floor
    for key, label, off in (("continuation", "continuation", -0.2), ("text", "text", 0.2)):
        vals = [max(c[key]["kl"] or 0.0, floor) for c in configs]
        axes[0].barh([i + off for i in y], vals, height=0.4, label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("mean KL(baseline ‖ config), nats")
    axes[0].legend(loc="upper right", fontsize=8)
    deltas = [c["text"]["ppl_delta_pct"] or 0.0 for c in configs]
    axes[1].barh(list(y), deltas, color="tab:red")
    for bound in (-2.0, 2.0):  # the issue's fp8/bf16 bound
        axes[1].axvline(bound, color="grey", linestyle="--", linewidth=1)
    axes[1].set_xlabel(f"perplexity change vs baseline ({_fmt(result['baseline']['ppl'], '.2f')}), %")
    flips = [100 * (c["greedy"]["flip_rate"] or 0.0) for c in configs]
    axes[2].barh(list(y), flips, color="tab:purple")
    axes[2].set_xlabel("greedy flip rate, % of prompts")
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"prefill / decode / KV wire vs unquantized {result['dtype']} ({Path(result['model']).name})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: str) -> list[Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / "eval.json", d / "eval.md", d / "eval.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(document(result))
    plot(result, paths[2])
    return paths
