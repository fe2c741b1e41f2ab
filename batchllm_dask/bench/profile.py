"""Where an `Engine.generate` call's time goes on the GPU: busy share, kernel classes, per-step host time.

    from batchllm_dask.bench.profile import profile_generate
    report = profile_generate(engine, prompts, params, out_dir="bench_out", name="shared-instructions")

It runs the call once under `torch.profiler` (CPU and CUDA activity) and reads
the kernel timeline of the exported trace:

- busy share: the union of the kernels' intervals over the wall time of the
  call (the GPU is "busy" when any kernel runs);
- kernel classes: matrix products (cuBLAS/cuTLASS), our attention (also per launch shape: its
  tile classes run as launches with different threads per block), our fused
  elementwise ops, sampling and the rest, by total kernel time;
- per step (when the engine marks its steps with `record_function("engine.step")`
  and its phases with names under "engine."): host milliseconds per phase.

The trace itself is written gzipped beside the report when it is small enough
to bring back from the device (the device tool returns files of 16 MiB at most).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

_CLASSES = (
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk")),
    ("attention", ("_paged_attention_kernel", "_merge_kernel", "flash", "attention")),
    ("fused_ops", ("_rms_norm_kernel", "_rope_store_kernel", "_silu_and_mul_kernel")),
    ("sampling", ("argmax", "topk", "sort", "gumbel", "scatter", "cumsum", "softmax")),
    ("copy", ("memcpy", "memset", "copy")),
)
_MAX_TRACE_BYTES = 15 << 20


def _launch_key(event: dict) -> str:
    """A kernel launch's name with its block and shared memory: at head_dim 128 both of the attention kernel's tile
    classes run 4 warps, and only their shared memory tells them apart."""
    args = event.get("args", {})
    smem = args.get("shared memory")
    smem_text = f", {smem // 1024} KiB shared" if isinstance(smem, int) else ""
    return f'{event["name"][:40]} block {args.get("block", "?")}{smem_text}'


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in _CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total


def _trace_events(prof: Any) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            raw = f.read()
    return json.loads(raw)["traceEvents"], raw


def _is_kernel(event: dict) -> bool:
    return event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_intervals(prof: Any) -> list[tuple[float, float]]:
    """[start, end) in microseconds of every kernel and device copy a finished profiler saw."""
    events, _ = _trace_events(prof)
    return [(e["ts"], e["ts"] + e["dur"]) for e in events if _is_kernel(e)]


def summarize_trace(events: list[dict], wall_us: float) -> dict[str, Any]:
    """Busy share, kernel time per class and per kernel, host time per engine phase, from trace events."""
    kernels = [e for e in events if _is_kernel(e)]
    intervals = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_launch: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_class[kernel_class(e["name"])] += e["dur"]
        entry = by_name[e["name"][:90]]
        entry[0] += e["dur"]
        entry[1] += 1
        if kernel_class(e["name"]) == "attention":  # the tile classes' launches differ in threads or shared memory
            entry = by_launch[_launch_key(e)]
            entry[0] += e["dur"]
            entry[1] += 1
    phases: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("engine."):
            phases[e["name"]][0] += e["dur"]
            phases[e["name"]][1] += 1
    span = (min(s for s, _ in intervals), max(t for _, t in intervals)) if intervals else (0.0, 0.0)
    timed = [e for e in events if e.get("ph") == "X" and "ts" in e]
    start = min((e["ts"] for e in timed), default=span[0])
    end = max((e["ts"] + e.get("dur", 0) for e in timed), default=span[1])
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "wall_ms": wall_us / 1e3,
        "kernel_span_ms": (span[1] - span[0]) / 1e3,
        "gpu_busy_ms": busy_union(intervals) / 1e3,
        "gpu_busy_share": busy_union(intervals) / wall_us if wall_us else 0.0,
        "kernels": len(kernels),
        "kernel_ms_by_class": {k: v / 1e3 for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n, "ms": t / 1e3, "count": c} for n, (t, c) in top],
        "attention_by_launch": [{"launch": n, "ms": t / 1e3, "count": c}
                                for n, (t, c) in sorted(by_launch.items(), key=lambda kv: -kv[1][0])],
        "gpu_idle_ms": idle_breakdown(intervals, start, end),
        "host_ms_by_phase": {k: {"ms": v[0] / 1e3, "count": v[1]} for k, v in sorted(phases.items())},
    }


def idle_breakdown(intervals: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """Where the GPU waits (ms), from kernel intervals in microseconds: before the first kernel (the host's
    setup: prompt checks, the prefix plan), after the last (the completions), and the gaps between, by length
    (short ones are launch latency; long ones, a host that fell behind)."""
    if not intervals:
        return {}
    ordered = sorted(intervals)
    gaps = {"under 0.1 ms": 0.0, "0.1-1 ms": 0.0, "over 1 ms": 0.0}
    reach = ordered[0][1]
    for s, t in ordered[1:]:
        if s > reach:
            gap = s - reach
            gaps["under 0.1 ms" if gap < 100 else "0.1-1 ms" if gap < 1000 else "over 1 ms"] += gap / 1e3
        reach = max(reach, t)
    return {"before first kernel": max(0.0, ordered[0][0] - start) / 1e3,
            "after last kernel": max(0.0, end - reach) / 1e3, **{f"gaps {k}": v for k, v in gaps.items()}}


def profile_generate(engine: Any, prompts: list, params: Any, out_dir: str | os.PathLike, name: str,
                     keep_trace: bool = True) -> dict:
    """Run `engine.generate(prompts, params)` once under torch.profiler; write and return the summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(cuda)
    engine.annotate_steps = True  # the loop marks its phases (engine.schedule, .launch, .wait, .resolve)
    try:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            engine.generate(prompts, params)
            _sync(cuda)
            wall = time.perf_counter() - start
    finally:
        engine.annotate_steps = False
    events, raw = _trace_events(prof)
    report = {"name": name, "steps": engine.last_stats.steps, **summarize_trace(events, wall * 1e6)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{name}.json").write_text(json.dumps(report, indent=1))
    packed = gzip.compress(raw.encode()) if keep_trace else b""
    if keep_trace and len(packed) <= _MAX_TRACE_BYTES:
        (out / f"trace_{name}.json.gz").write_bytes(packed)
    return report


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def print_report(report: dict) -> None:
    cls = ", ".join(f"{k} {v:.0f}" for k, v in report["kernel_ms_by_class"].items())
    print(f"[profile {report['name']}] wall {report['wall_ms']:.0f} ms, GPU busy {report['gpu_busy_ms']:.0f} ms "
          f"({report['gpu_busy_share']:.0%}), {report['kernels']} kernels, {report['steps']} steps; ms by class: {cls}",
          flush=True)
    for k in report["top_kernels"][:12]:
        print(f"    {k['ms']:8.1f} ms {k['count']:6d}x  {k['name']}", flush=True)
    idle = report.get("gpu_idle_ms", {})
    if idle:
        print("    GPU idle ms: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()), flush=True)
    for phase, v in report["host_ms_by_phase"].items():
        print(f"    host {phase}: {v['ms']:.0f} ms over {v['count']}", flush=True)
