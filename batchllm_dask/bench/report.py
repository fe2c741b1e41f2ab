"""Join one benchmark run's results (bench.engine, bench.vllm_peer) into tables, a JSON summary and a chart.

    python -m batchllm_dask.bench.report DIR      # reads DIR/bench_engine_*.json and DIR/vllm_*.json

Every figure is held against the bound of our run (the ceilings it measured); vLLM's times come from the
same machine in the same device session.  Prints markdown tables; writes DIR/bench_summary.json and
DIR/bench_chart.png (each engine's share of the bound per workload, the bound at 100%).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(folder: Path) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for path in sorted(folder.glob("bench_engine_*.json")):
        data = json.loads(path.read_text())
        models[data["model"]] = {"ours": data, "vllm": {}}
    for path in sorted(folder.glob("vllm_*.json")):
        data = json.loads(path.read_text())
        if data["model"] in models:
            for row in data["rows"]:
                key = (row["workload"], row["scale"], row.get("kv_gib"))
                models[data["model"]]["vllm"][key] = row
    return models


def summarize(model: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, scale, pool) of the full engine (or the pool run), with peers and ablations."""
    runs = model["ours"]["runs"]
    full = {(r["workload"], r["scale"]): r for r in runs if r["variant"] == "full"}
    rows = []
    for r in runs:
        if r["variant"] == "full" or r["variant"].startswith("kv"):
            kv = float(r["variant"][2:-3]) if r["variant"].startswith("kv") else None
            peer = model["vllm"].get((r["workload"], r["scale"], kv))
            row = {k: r[k] for k in ("workload", "scale", "variant", "seconds", "bound_seconds", "share_of_bound",
                                     "output_tokens_per_s", "gpu_busy_share", "mean_tokens_per_step",
                                     "host_ms_per_step", "computed_prompt_tokens", "unique_prompt_tokens",
                                     "preemptions", "complete")}
            if peer is not None and not peer["wrong_lengths"]:
                row.update(vllm_seconds=peer["seconds"], vllm_share_of_bound=r["bound_seconds"] / peer["seconds"],
                           ours_vs_vllm=peer["seconds"] / r["seconds"])
            rows.append(row)
    for r in runs:
        if r["variant"] not in ("full",) and not r["variant"].startswith("kv"):
            base = full.get((r["workload"], r["scale"]))
            if base is not None:
                rows.append({"workload": r["workload"], "scale": r["scale"], "variant": r["variant"],
                             "seconds": r["seconds"], "slowdown_vs_full": r["seconds"] / base["seconds"],
                             "identical_to_full": (r.get("agreement_with_full") or {}).get("identical")})
    return rows


def markdown(name: str, rows: list[dict[str, Any]], hf: list[dict]) -> str:
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    num = lambda x, f="{:.2f}": "-" if x is None else f.format(x)  # noqa: E731
    lines = [f"### {name}", "",
             "| workload | scale | pool | bound s | ours s | of bound | GPU busy | tok/step | host ms/step | "
             "computed / unique prompt | vLLM s | vLLM of bound | ours vs vLLM |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "bound_seconds" not in r:
            continue
        pool = r["variant"][2:] if r["variant"].startswith("kv") else "default"
        lines.append(f"| {r['workload']} | {r['scale']:g} | {pool} | {r['bound_seconds']:.2f} | {r['seconds']:.2f} | "
                     f"{pct(r['share_of_bound'])} | {pct(r['gpu_busy_share'])} | {r['mean_tokens_per_step']:.0f} | "
                     f"{r['host_ms_per_step']:.2f} | {r['computed_prompt_tokens']:,} / {r['unique_prompt_tokens']:,} | "
                     f"{num(r.get('vllm_seconds'))} | {pct(r.get('vllm_share_of_bound'))} | "
                     f"{num(r.get('ours_vs_vllm'), '{:.2f}x')} |")
    ablations = [r for r in rows if "slowdown_vs_full" in r]
    if ablations:
        lines += ["", "| ablation | workload | scale | s | full engine's time x | greedy tokens identical |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['workload']} | {r['scale']:g} | {r['seconds']:.2f} | "
                  f"{r['slowdown_vs_full']:.2f} | {pct(r['identical_to_full'])} |" for r in ablations]
    for h in hf:
        lines.append(f"\ntransformers static `generate` {h['workload']} scale {h['scale']:g}: {h['seconds']:.2f} s, "
                     f"{h['share_of_bound']:.1%} of the bound")
    return "\n".join(lines)


def chart(models: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, s) for m, rows in models.items() for s in sorted({r["scale"] for r in rows if "bound_seconds" in r
                                                                     and r["variant"] == "full"})]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (m, scale) in zip(axes[0], panels):
        rows = [r for r in models[m] if r.get("variant") == "full" and r["scale"] == scale]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["share_of_bound"] for r in rows], 0.4, label="batchllm-dask")
        ax.bar([i + 0.2 for i in x], [r.get("vllm_share_of_bound") or 0 for r in rows], 0.4, label="vLLM")
        ax.axhline(1.0, color="black", linewidth=1, label="roofline bound")
        ax.set_xticks(list(x), [r["workload"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{m}, scale {scale:g}")
        ax.set_ylabel("share of the bound")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    models = load(args.folder)
    summary = {name: summarize(m) for name, m in models.items()}
    for name, rows in summary.items():
        print(markdown(name, rows, models[name]["ours"].get("transformers_static", [])) + "\n")
    (args.folder / "bench_summary.json").write_text(json.dumps(summary, indent=1))
    if summary:
        chart(summary, args.folder / "bench_chart.png")
    return summary


if __name__ == "__main__":
    main()
