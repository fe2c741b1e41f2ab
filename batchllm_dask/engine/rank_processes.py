"""The processes of a tensor-parallel engine: rank 0 in the caller, ranks 1..N-1 started here.

Each other rank is a plain subprocess (`python -m batchllm_dask.engine.rank_processes`),
not a multiprocessing child: a Dask worker process is daemonic and may not
have multiprocessing children, and a fresh interpreter imports nothing of the
caller's state.  Rank 0 talks to each over the child's stdin and stdout
(pickled messages; the child's own prints go to stderr):

    rank 0 -> child: ("setup", model, config, rank, size, init_method)   once
                     ("generate", prompts, sampling)                     per call
                     ("stop",)                                           at close
    child -> rank 0: ("ready",) | ("done",) | ("error", traceback text)

The collectives themselves run over torch.distributed (NCCL or gloo).  When
rank 0's process goes away its pipes close, and the children see end-of-file
and exit: no orphans.  Every child starts with NVLink multicast off.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from .parallel import RankGroup, close_group, init_group, multicast_off, rank_device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(stream: BinaryIO, message: tuple) -> None:
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _child_env() -> dict[str, str]:
    """The caller's environment, multicast off, and this package importable first."""
    env = multicast_off(dict(os.environ))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


class RankProcesses:
    """Ranks 1..size-1 of a group whose rank 0 is this process."""

    def __init__(self, model: str, config: Any, size: int):
        self.size = size
        self.closed = False
        self.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.children = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=_child_env()) for _ in range(1, size)]
        for rank, child in enumerate(self.children, start=1):
            _send(child.stdin, ("setup", model, config, rank, size, self.init_method))

    def join(self, base_device: str | None) -> RankGroup:
        """Rank 0 joins the group (waits for every child to connect)."""
        return init_group(0, self.size, rank_device(base_device, 0, self.size), self.init_method)

    def wait_ready(self) -> None:
        self._replies("ready")

    def run(self, generate: Any, prompts: Any, sampling: Any, progress: Any) -> Any:
        """`generate(prompts, sampling, progress)` here (rank 0) and on every child rank; rank 0's result.

        A failure here stops the children (they may be waiting in a collective): the engine is then closed.
        """
        if self.closed:
            raise RuntimeError("this tensor-parallel engine is closed (its rank processes are stopped)")
        for child in self.children:
            _send(child.stdin, ("generate", prompts, sampling))
        try:
            out = generate(prompts, sampling, progress)
        except BaseException:
            self.close()
            raise
        self._replies("done")
        return out

    def _replies(self, expected: str) -> None:
        errors = []
        for rank, child in enumerate(self.children, start=1):
            try:
                reply = pickle.load(child.stdout)
            except EOFError:
                reply = ("error", f"rank {rank} exited with code {child.wait()}")
            if reply[0] != expected:
                errors.append(f"rank {rank}: {reply[1] if len(reply) > 1 else reply}")
        if errors:
            raise RuntimeError("tensor-parallel rank failed:\n" + "\n".join(errors))

    def close(self) -> None:
        """Stop the children (politely, then by force) and leave the process group."""
        for child in self.children:
            try:
                _send(child.stdin, ("stop",))
                child.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.closed = True
        close_group()


def start_ranks(model: str, config: Any) -> tuple[RankProcesses, RankGroup]:
    """Start ranks 1..N-1 of `config.tensor_parallel_size` and join as rank 0.

    The checkpoint's heads are checked first, so that a model that does not shard raises here, at once.
    """
    from .loader import read_config
    from .model import ModelArgs
    from .parallel import check_shardable
    args = ModelArgs.from_hf_config(read_config(model))
    size = config.tensor_parallel_size
    check_shardable(args.num_heads, args.num_kv_heads, args.intermediate_size, size)
    rank_device(config.device, 0, size)  # enough GPUs?
    ranks = RankProcesses(model, config, size)
    try:
        return ranks, ranks.join(config.device)
    except BaseException:
        ranks.close()
        raise


def _serve(inbox: BinaryIO, outbox: BinaryIO) -> None:
    """A child rank: set up, build the engine, then run every generate call rank 0 sends."""
    from .engine import Engine
    _, model, config, rank, size, init_method = pickle.load(inbox)
    try:
        group = init_group(rank, size, rank_device(config.device, rank, size), init_method)
        engine = Engine(model, config=config, _rank_group=group)
        _send(outbox, ("ready",))
    except Exception:  # noqa: BLE001 - reported to rank 0
        _send(outbox, ("error", traceback.format_exc()))
        return
    while True:
        try:
            message = pickle.load(inbox)
        except EOFError:
            break
        if message[0] == "stop":
            break
        try:
            engine.generate(message[1], message[2], progress=False)
            _send(outbox, ("done",))
        except Exception:  # noqa: BLE001 - reported to rank 0
            _send(outbox, ("error", traceback.format_exc()))
    close_group()


def main() -> None:
    multicast_off()
    inbox = sys.stdin.buffer
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints from here on go to stderr, not the channel
    _serve(inbox, outbox)


if __name__ == "__main__":
    main()
