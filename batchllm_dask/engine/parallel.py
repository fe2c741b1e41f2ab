"""Tensor parallelism inside the engine: the rank group, Megatron-style sharded layers, sharded loading.

    engine = Engine("/models/llama-70b", tensor_parallel_size=2)   # one process per rank

Design: every rank runs the whole engine (SPMD).  Rank 0 lives in the caller's
process and starts ranks 1..N-1 as processes of their own (rank_processes.py);
each `generate` call's prompts and sampling parameters go to every rank once,
and every rank then runs the same deterministic planner, scheduler and loop on
them.  Nothing is sent per step but what the model itself needs:

- **Layers** (Megatron): q/k/v and gate/up are column-parallel (each rank holds
  its heads' rows, its half of the intermediate rows), o_proj and down_proj are
  row-parallel (each rank holds the matching input columns) followed by one
  all-reduce: two all-reduces per layer.  The shards are cut from the
  checkpoint's separate q/k/v and gate/up tensors *before* the loader fuses
  them, so a rank's fused qkv_proj is [its q heads | its kv heads | ...] and its
  gate_up_proj is [its gate rows | its up rows]: fusing stays rank-local.
- **Heads.** Query heads split evenly.  With at least as many KV heads as ranks
  they split evenly too; with fewer (GQA with 8 KV heads on 16 ranks, or MQA),
  each rank keeps a replica of the one KV head its query heads read.
- **Embedding and lm_head** are replicated: the simplest correct choice; the
  lm_head of a 70B model is 2 GB in bf16, small beside its 140 GB of layers.
- **Tokens.** Every rank samples, then rank 0's tokens are broadcast (one
  [R] int64 collective per step, queued on the stream): ranks cannot diverge
  even if two GPUs rounded a logit differently, so their schedulers stay in
  lock-step.

Why not rank 0 scheduling and broadcasting each step's inputs: the engine's
loop runs a step ahead of the device with pinned staging buffers, CUDA graphs
and on-device token feeds; shipping every step's host arrays to the other ranks
would add a host round trip per step.  The scheduler is pure and deterministic,
so the same inputs give the same steps on every rank for free.  What must agree
and is not derived from the inputs (the number of KV pages, from free memory)
is agreed once at start (the minimum over ranks).

The process group is torch.distributed's default group: NCCL on CUDA, gloo on
the CPU, so one tensor-parallel engine per process at a time (`Engine.close`
frees it).  NVLink multicast stays off in every rank process (`MULTICAST_OFF`).
A CUDA out-of-memory error inside a step is not retried under tensor parallelism
(the ranks would disagree on the retry): it raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off(env: dict[str, str] | os._Environ = os.environ) -> dict[str, str] | os._Environ:
    """Set the variables that keep NVLink multicast off, where not set already; returns `env`."""
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    return env


# ----------------------------------------------------------------------------- the rank group

@dataclass
class RankGroup:
    """This process's place in a tensor-parallel group (torch.distributed's default group)."""

    rank: int
    size: int
    device: torch.device

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum `t` over the ranks, in place (every rank gets the same bits)."""
        torch.distributed.all_reduce(t)
        return t

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Rank src's `t` on every rank, in place."""
        torch.distributed.broadcast(t, src)
        return t

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (the KV pages all ranks can hold)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())


def rank_device(base: str | None, rank: int, size: int) -> torch.device:
    """The device of `rank`: cuda:(base index + rank) on CUDA, the CPU otherwise."""
    device = torch.device(base or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return torch.device("cpu")
    index = (device.index or 0) + rank
    if (device.index or 0) + size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={size} from {device} needs {(device.index or 0) + size} GPUs, "
                         f"{torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", index)


def init_group(rank: int, size: int, device: torch.device, init_method: str) -> RankGroup:
    """Join the group: NCCL on CUDA, gloo on the CPU; a first collective creates the communicators."""
    multicast_off()
    dist = torch.distributed
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: a tensor-parallel engine "
                           "needs the default process group to itself (close the other engine first)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=size, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size)
    group = RankGroup(rank, size, device)
    group.all_reduce(torch.zeros(1, device=device))
    return group


def close_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the sharding

@dataclass(frozen=True)
class Shard:
    """What one rank holds: query heads [q0, q1), KV heads [kv0, kv1), intermediate rows [i0, i1)."""

    q0: int
    q1: int
    kv0: int
    kv1: int
    i0: int
    i1: int


def check_shardable(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """ValueError naming what does not divide: heads, KV heads (or their replication), intermediate size."""
    problems = []
    if num_heads % size:
        problems.append(f"num_attention_heads={num_heads} is not a multiple of it")
    if num_kv_heads >= size and num_kv_heads % size:
        problems.append(f"num_key_value_heads={num_kv_heads} is not a multiple of it")
    if num_kv_heads < size and size % num_kv_heads:
        problems.append(f"num_key_value_heads={num_kv_heads} does not divide it (KV heads are replicated)")
    if intermediate_size % size:
        problems.append(f"intermediate_size={intermediate_size} is not a multiple of it")
    if problems:
        raise ValueError(f"tensor_parallel_size={size}: " + "; ".join(problems))


def shard_of(args, rank: int, size: int) -> Shard:
    """Rank `rank`'s heads and rows of a model with `args` (ModelArgs) over `size` ranks."""
    check_shardable(args.num_heads, args.num_kv_heads, args.intermediate_size, size)
    hq, inter = args.num_heads // size, args.intermediate_size // size
    if args.num_kv_heads >= size:
        hkv = args.num_kv_heads // size
        kv0 = rank * hkv
    else:  # replicated: the one KV head that this rank's query heads belong to
        hkv, kv0 = 1, rank * hq // (args.num_heads // args.num_kv_heads)
    return Shard(rank * hq, (rank + 1) * hq, kv0, kv0 + hkv, rank * inter, (rank + 1) * inter)


def local_args(args, size: int):
    """The ModelArgs of one rank's model: its heads, KV heads and intermediate rows; the rest unchanged."""
    s = shard_of(args, 0, size)
    return replace(args, num_heads=s.q1 - s.q0, num_kv_heads=s.kv1 - s.kv0, intermediate_size=s.i1 - s.i0)


def _slices(name: str, s: Shard, head_dim: int) -> tuple[int, slice] | None:
    """(dim, range) of checkpoint tensor `name` that the rank holds; None for a replicated tensor."""
    rows = {"q_proj": (s.q0 * head_dim, s.q1 * head_dim), "k_proj": (s.kv0 * head_dim, s.kv1 * head_dim),
            "v_proj": (s.kv0 * head_dim, s.kv1 * head_dim), "gate_proj": (s.i0, s.i1), "up_proj": (s.i0, s.i1)}
    cols = {"o_proj": (s.q0 * head_dim, s.q1 * head_dim), "down_proj": (s.i0, s.i1)}
    parts = name.split(".")
    if len(parts) < 2:
        return None
    layer, kind = parts[-2], parts[-1]
    if layer in rows:
        return 0, slice(*rows[layer])
    if layer in cols and kind == "weight":  # a row-parallel bias is added once, after the all-reduce
        return 1, slice(*cols[layer])
    return None


class RowParallelLinear(nn.Module):
    """y = all_reduce(x @ W_rank^T) + b: x holds this rank's input columns, the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: RankGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        y = self.group.all_reduce(nn.functional.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def make_row_parallel(model: nn.Module, group: RankGroup) -> None:
    """Replace every layer's o_proj and down_proj (built with the rank's input width) by row-parallel ones."""
    for layer in model.model.layers:
        for owner, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            old = getattr(owner, name)
            setattr(owner, name, RowParallelLinear(old.in_features, old.out_features, old.bias is not None, group))


def _read_shard(files: list[Path], wanted: set[str], shard: Shard, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, Tensor]:
    """The rank's slice of every wanted tensor (only that slice is read from the file), cast, on device."""
    from safetensors import safe_open
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in wanted:
                    continue
                cut = _slices(name, shard, head_dim)
                if cut is None:
                    t = f.get_tensor(name)
                elif cut[0] == 0:
                    t = f.get_slice(name)[cut[1]]
                else:
                    t = f.get_slice(name)[:, cut[1]]
                tensors[name] = t.to(device=device, dtype=dtype).contiguous()
    return tensors


def load_shard(path: str | os.PathLike, dtype: torch.dtype, device: torch.device, group: RankGroup):
    """This rank's model (its shard of every layer, row-parallel projections, fused) and its local ModelArgs."""
    from .files import check_checkpoint
    from .model import CausalLM
    args, files = check_checkpoint(path)  # a bad checkpoint: an error naming the file, on every rank alike
    shard, mine = shard_of(args, group.rank, group.size), local_args(args, group.size)
    with torch.device("meta"):
        model = CausalLM(mine)
    make_row_parallel(model, group)
    wanted = set(model.state_dict())
    if mine.tie_word_embeddings:
        wanted.discard("lm_head.weight")
    tensors = _read_shard(files, wanted, shard, args.head_dim, dtype, device)
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ValueError(f"checkpoint {Path(path)} is missing {len(missing)} tensors, e.g. {missing[:5]}")
    model.load_state_dict(tensors, strict=True if not mine.tie_word_embeddings else False, assign=True)
    del tensors
    if mine.tie_word_embeddings:
        model.tie_weights()
    model.fuse_projections()
    return model.to(device).eval(), mine
