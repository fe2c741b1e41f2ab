"""Host milliseconds per engine step, with the model's cost taken out: what the loop spends on this CPU.

    python -m batchllm_dask.bench.host_time [--scales 0.25,1.0] [--workloads a,b] [--profile N]

The engine runs the standard workloads (workloads.py, greedy, EOS ignored) at the llama-1b shape's settings
(16384-token budget, max_num_seqs 512, page size 16, a KV pool that holds everything), on a tiny random
checkpoint whose attention heads are llama-1b's (32 query heads, 8 KV heads: the tile plan's shape), with
the device work stubbed out (`HostOnlyRunner`): no forward pass, no sampling, but everything the host does
on the GPU path stays, through the real code:

- scheduling, step inputs, commit, placeholders and resolve (stop checks) as in `Engine._run`;
- the attention tile plan (`plan_on_host`), split for mixed steps as `ModelRunner` plans them for the
  Triton kernel, fixed-grid for graphed steps as `DecodeGraphs` and `MixedGraphs` plan and lay them out for a
  replay (steps with prefill chunks sized by the scheduler for the mixed graphs, as on CUDA);
- the one staging copy of a step's arrays (into a plain host buffer here, pinned on CUDA).

The tokens "sampled" are a fixed valid id, instantly.  Printed per workload and scale: steps, tokens per
step, and host ms per step of each phase of the loop (engine.schedule / launch / wait / resolve, and inside
launch: build_step_inputs, the tile plan, the rest of the launch), the whole loop, and the rest of the
`generate` call (prompt checks, the prefix plan, the requests, the completions) per step.  --profile N prints
cProfile's N heaviest functions (by own time) of each run; --clock cpu (default) times this thread's CPU
time, --clock wall the wall clock; --repeat N runs each workload N times and prints
the run of least loop time (the CPU may be shared).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..engine import Engine, SamplingParams
from ..engine import cuda_graphs as graphs_module
from ..engine import engine as engine_module
from ..engine.cuda_graphs import DecodeGraphs
from ..engine.mixed_graphs import MixedGraphs
from ..engine.kv_cache import kv_bytes_per_page
from ..engine.runner import ModelRunner, StepLogits, _device_work
from ..engine.staging import SampledTokens
from ..kernels import attention_plan as ap
from ..kernels import prefix_attention
from ..roofline import SHAPES
from .checkpoints import save_tiny_checkpoint
from .workloads import WORKLOADS, make_workload

SHAPE = SHAPES["llama-1b"]
TOKEN_BUDGET = 16384
MAX_NUM_SEQS = 512
PAGE_SIZE = 16
KV_PAGES = 1 << 17  # every workload at scale 1 fits without preemption
GRAPH_MAX_TOKENS = 4096  # EngineConfig.cuda_graph_max_tokens's default
STUB_TOKEN = 300  # the id every stubbed sample returns (a valid id, never EOS: EOS is ignored anyway)
_PHASES = ("engine.schedule", "engine.launch", "  build_step_inputs", "  tile plan", "  rest of launch",
           "engine.wait", "engine.resolve", "loop", "outside loop")


class PhaseTimes:
    """Seconds per named phase, summed over a run.

    clock: time.thread_time (this thread's CPU time: on a CPU that other processes share, what the host path
    costs without their share of the cores; nothing in the stubbed loop sleeps) or time.perf_counter (wall).
    """

    def __init__(self, clock=time.thread_time) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.clock = clock

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self.clock()
        try:
            yield
        finally:
            self.seconds[name] += self.clock() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


def _no_capture(forward):
    """A CUDA graph "capture" that captures nothing: a replay does no work, its output is a placeholder
    (a row per token of the largest mixed step, from which the mixed graphs pick the sampled rows)."""
    return (lambda: None), torch.zeros(GRAPH_MAX_TOKENS, 1)


class _NoHead:
    """The LM head that the graphs run after a replay: nothing either."""

    @staticmethod
    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class HostOnlyRunner:
    """Turns `engine.runner` into the host half of itself: planning and staging run, the device work does not.

    The runner takes the GPU path's branches: the Triton tile plan of every eager step, and the CUDA graphs
    of decode-only steps (`DecodeGraphs` with a capture that records nothing, so `run` plans, lays out and
    copies the step as on CUDA, then "replays" nothing).
    """

    def __init__(self, runner: ModelRunner, max_num_seqs: int):
        self.runner = runner
        runner.triton_plans = True
        runner.graphs = DecodeGraphs(runner.model, runner.k_cache, runner.v_cache, runner.scratch_page,
                                     max_num_seqs, capture=_no_capture)
        runner.mixed_graphs = MixedGraphs(runner.model, runner.k_cache, runner.v_cache, runner.scratch_page,
                                          GRAPH_MAX_TOKENS, capture=_no_capture)
        runner.graphs.model = runner.mixed_graphs.model = _NoHead()
        runner.step_sizes = runner.mixed_graphs.sizes
        runner._eager = self._eager
        runner.sample = self._sample

    def _eager(self, inputs, dev, plan, feed):
        """What the real eager launch does on the host before the model runs (the model does not run)."""
        work = _device_work(inputs.work, dev)
        prefix_attention.attach_plan(work, ap.device_plan_from_arrays(plan, dev))
        return torch.zeros(len(inputs.logits_rows), 1)

    def _sample(self, step: StepLogits, mask=None) -> SampledTokens:
        tokens = torch.full((len(step.sampling.temperature),), STUB_TOKEN, dtype=torch.int64)
        return SampledTokens(tokens, tokens, None)


def make_engine(folder: Path) -> Engine:
    """An engine on a tiny checkpoint with llama-1b's attention heads, its runner made host-only."""
    head_dim = 16
    path = save_tiny_checkpoint(folder / "tiny-1b-heads", SHAPE.vocab, num_hidden_layers=1, hidden_size=64,
                                intermediate_size=64, num_attention_heads=SHAPE.heads,
                                num_key_value_heads=SHAPE.kv_heads, head_dim=head_dim,
                                max_position_embeddings=8192, tie_word_embeddings=True)
    page_bytes = kv_bytes_per_page(PAGE_SIZE, 1, SHAPE.kv_heads, head_dim, 4)
    engine = Engine(path, dtype="float32", device="cpu", max_num_batched_tokens=TOKEN_BUDGET,
                    max_num_seqs=MAX_NUM_SEQS, page_size=PAGE_SIZE, kv_cache_bytes=KV_PAGES * page_bytes,
                    cuda_graphs=False)
    HostOnlyRunner(engine.runner, MAX_NUM_SEQS)
    return engine


def measure(engine: Engine, workload: str, scale: float, profile: int = 0, clock=time.thread_time) -> dict:
    """One generate of the workload with the phases timed (`PhaseTimes`' clock); host ms per step of each phase."""
    reqs = make_workload(workload, SHAPE.vocab, scale)
    prompts = [r.prompt_token_ids for r in reqs]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    times = PhaseTimes(clock)
    patches = [(engine_module, "record_function", times.phase),
               (engine_module, "build_step_inputs", times.wrap("  build_step_inputs",
                                                                engine_module.build_step_inputs)),
               (prefix_attention, "host_plan", times.wrap("  tile plan", prefix_attention.host_plan)),
               (graphs_module, "host_plan", times.wrap("  tile plan", graphs_module.host_plan)),
               (engine, "_run", times.wrap("loop", engine._run)),
               (engine, "_generate", times.wrap("generate", engine._generate))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    engine.annotate_steps = True
    profiler = cProfile.Profile() if profile else None
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        if profiler is not None:
            profiler.enable()
        engine.generate(prompts, params)
    finally:
        if profiler is not None:
            profiler.disable()
        for obj, name, value in saved:
            setattr(obj, name, value)
        for name in ("_run", "_generate"):
            vars(engine).pop(name, None)
        engine.annotate_steps = False
    stats = engine.last_stats
    steps = max(stats.steps, 1)
    seconds = dict(times.seconds)
    seconds["  rest of launch"] = seconds.get("engine.launch", 0.0) - seconds.get("  build_step_inputs", 0.0) \
        - seconds.get("  tile plan", 0.0)
    seconds["outside loop"] = seconds.get("generate", 0.0) - seconds.get("loop", 0.0)
    out = {"workload": workload, "scale": scale, "requests": len(reqs), "steps": stats.steps,
           "tokens_per_step": stats.mean_tokens_per_step,
           "ms_per_step": {name: 1e3 * seconds.get(name, 0.0) / steps for name in _PHASES}}
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile)
        out["profile"] = text.getvalue()
    return out


def format_row(r: dict) -> str:
    ms = r["ms_per_step"]
    cells = " ".join(f"{ms[name]:8.2f}" for name in _PHASES)
    return f"{r['workload']:20s} {r['scale']:5g} {r['requests']:5d} {r['steps']:5d} {r['tokens_per_step']:7.0f} {cells}"


def header() -> str:
    names = ["schedule", "launch", "inputs", "plan", "launch-", "wait", "resolve", "loop", "outside"]
    return (f"{'workload':20s} {'scale':>5s} {'reqs':>5s} {'steps':>5s} {'tok/st':>7s} "
            + " ".join(f"{n:>8s}" for n in names) + "   (host ms per step)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="0.25,1.0")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's N heaviest functions per run")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this thread's CPU time (default; robust on a shared CPU), wall: perf_counter")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload; the one of least loop time is "
                                                               "printed (other processes on the CPU add noise)")
    args = parser.parse_args(argv)
    # One intra-op thread: the stub's few CPU tensor copies stand for device copies on CUDA, and a pool of
    # spinning threads on a CPU that other processes share turns them into the noisiest part of a step.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(Path(tmp))
        engine.generate([[256 + i for i in range(40)]] * 4, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        print(f"CPU: {_cpu_name()}; stub model (no forward, no sampling); llama-1b heads "
              f"{SHAPE.heads}/{SHAPE.kv_heads}, budget {TOKEN_BUDGET}, max_num_seqs {MAX_NUM_SEQS}, "
              f"page {PAGE_SIZE}, {KV_PAGES} KV pages; {args.clock} time")
        print(header())
        for scale in (float(s) for s in args.scales.split(",")):
            for name in args.workloads.split(","):
                clock = time.thread_time if args.clock == "cpu" else time.perf_counter
                runs = [measure(engine, name, scale, args.profile, clock) for _ in range(max(1, args.repeat))]
                result = min(runs, key=lambda r: r["ms_per_step"]["loop"])
                print(format_row(result), flush=True)
                if "profile" in result:
                    print(result["profile"])


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
