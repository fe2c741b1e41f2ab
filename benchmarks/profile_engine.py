"""Device diag: per-workload kernel-class breakdown of Engine.generate (CUDA activity only)."""
import json, os, sys, time
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
from batchllm_dask.engine import Engine
from batchllm_dask.bench.engine import params_of, warm_up
from batchllm_dask.bench.checkpoints import save_random_checkpoint
from batchllm_dask.bench.profile import summarize_trace, _trace_events
from batchllm_dask.bench.workloads import make_workload
from batchllm_dask.roofline import SHAPES, lower_bound

model = sys.argv[1]; workloads = sys.argv[2].split(","); scale = float(sys.argv[3])
opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
OUT = Path(os.environ.get("OUT", "."))
path = Path("/tmp/ck") / model
if not (path / "config.json").exists():
    t = time.time(); save_random_checkpoint(path, model); print(f"checkpoint in {time.time()-t:.0f} s", flush=True)
t = time.time()
eng = Engine(path, dtype="bfloat16", device="cuda", **opts)
print(f"engine in {time.time()-t:.0f} s; budget {eng.max_num_batched_tokens}", flush=True)
warm_up(eng, SHAPES[model].vocab)
ceil = (790e12, 4.28e12)
res = {}
for name in workloads:
    reqs = make_workload(name, SHAPES[model].vocab, scale)
    ids, ps = [r.prompt_token_ids for r in reqs], params_of(reqs)
    torch.cuda.synchronize(); t = time.perf_counter(); eng.generate(ids, ps); torch.cuda.synchronize()
    wall = time.perf_counter() - t
    st = eng.last_stats
    bound = lower_bound(SHAPES[model], reqs, *ceil)["seconds"]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter(); eng.generate(ids, ps); torch.cuda.synchronize(); pw = time.perf_counter() - t
    events, _ = _trace_events(prof)
    s = summarize_trace(events, pw * 1e6)
    res[name] = dict(seconds=wall, bound=bound, share=bound / wall, steps=st.steps, tok_step=st.mean_tokens_per_step,
                     host_ms=1e3 * st.host_seconds / max(st.steps, 1), profile=s)
    print(f"== {model} {name} x{scale}: {wall:.2f} s, {bound/wall:.1%} of bound, {st.steps} steps, "
          f"{st.mean_tokens_per_step:.0f} tok/step, host {1e3*st.host_seconds/max(st.steps,1):.1f} ms/step; "
          f"busy {s['gpu_busy_share']:.0%} (profiled wall {pw:.2f})", flush=True)
    print("   class ms: " + ", ".join(f"{k} {v:.0f}" for k, v in s["kernel_ms_by_class"].items()), flush=True)
    for k in s["attention_by_launch"]:
        print(f"   attention {k['ms']:8.1f} ms {k['count']:6d}x {k['launch']}", flush=True)
    for k in s["top_kernels"][:10]:
        print(f"   {k['ms']:8.1f} ms {k['count']:6d}x {k['name']}", flush=True)
json.dump(res, open(OUT / f"profile_{model}.json", "w"), indent=1)
