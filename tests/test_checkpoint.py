"""generate(..., checkpoint=DIR): finished partitions recorded as they complete, a re-run resumes.

The job is interrupted by a partition that raises (a test hook on the partition
runner); the prompts that reach the engine are counted on every run, so that a
resumed run is seen to generate only the rows not finished, and to read the
others back.
"""
from __future__ import annotations

import glob
import json
import os

import dask
import numpy as np
import pandas as pd
import pytest

import batchllm_dask  # noqa: F401 - registers .llm
from batchllm_dask import cli, worker
from batchllm_dask.checkpoint import MANIFEST, part_name
from batchllm_dask.engine import Engine, SamplingParams
from _helpers import spy_engine_prompts, to_dask

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
SAMPLING = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
RESULT = ["completion", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason", "error"]


def rows(n_groups: int = 3, size: int = 5, seed: int = 0) -> pd.DataFrame:
    """Token-id prompts in prefix groups, a text row, two bad rows; a unique string index, shuffled."""
    rng = np.random.default_rng(seed)
    prompts: list[object] = []
    for _ in range(n_groups):
        prefix = rng.integers(3, 250, 48).tolist()
        prompts += [prefix + rng.integers(3, 250, int(rng.integers(3, 9))).tolist() for _ in range(size)]
    prompts += ["a text row", None, ""]
    df = pd.DataFrame({"prompt": pd.Series(prompts, dtype=object), "n": np.arange(len(prompts))})
    df.index = pd.Index([f"r{i:03d}" for i in range(len(df))], name="rid")
    return df.sample(frac=1.0, random_state=seed)


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture
def engine_prompts(monkeypatch) -> list:
    """Every prompt that reaches an engine in this process (the jobs run on Dask's sync scheduler)."""
    return spy_engine_prompts(monkeypatch)


def interrupt_after_first_part(monkeypatch, folder) -> None:
    """The partition runner raises once a part is in the folder: the job dies with some partitions finished."""
    real = worker.generate_rows

    def generate_rows(*args, **kwargs):
        if glob.glob(os.path.join(folder, "part-*.parquet")):
            raise RuntimeError("interrupted (test)")
        return real(*args, **kwargs)
    monkeypatch.setattr(worker, "generate_rows", generate_rows)


def job(df: pd.DataFrame, model: str, folder, **options):
    opts = {**SAMPLING, **ENGINE, "npartitions": 1, "partition_tokens": 150, **options}
    return to_dask(df, 2).llm.generate("prompt", model, checkpoint=str(folder), **opts)


def test_an_interrupted_job_resumes_with_only_the_unfinished_rows(model, tmp_path, monkeypatch, engine_prompts):
    df, folder = rows(), tmp_path / "ckpt"
    runnable = df["prompt"].map(lambda p: p is not None and len(p) > 0).sum()
    with dask.config.set(scheduler="sync"), monkeypatch.context() as m:
        interrupt_after_first_part(m, str(folder))
        out = job(df, model, folder)
        assert out.npartitions >= 3                        # bounded partitions: something to resume
        with pytest.raises(RuntimeError, match="interrupted"):
            out.compute()
    finished = pd.read_parquet(folder)                     # the finished rows, readable by pandas
    assert 0 < len(finished) < len(df) and finished.index.is_unique and set(finished.columns) == set(RESULT)
    first = len(engine_prompts)
    with dask.config.set(scheduler="sync"):
        result = job(df, model, folder).compute()
    resumed = len(engine_prompts) - first
    assert resumed == runnable - finished["finish_reason"].ne("error").sum()  # finished rows not generated again
    assert len(result) == len(df) and sorted(result.index) == sorted(df.index)
    direct = Engine(model, **ENGINE).generate(df["prompt"].tolist(), SamplingParams(**SAMPLING))
    result = result.loc[df.index]
    assert result["finish_reason"].tolist() == [o.finish_reason for o in direct]
    assert result["completion"].fillna("<error>").tolist() == [o.text if o.finish_reason != "error" else "<error>"
                                                               for o in direct]
    pd.testing.assert_frame_equal(result[df.columns], df)  # the input columns as they were
    assert len(pd.read_parquet(folder)) == len(df)
    before = len(engine_prompts)
    with dask.config.set(scheduler="sync"):
        again = job(df, model, folder).compute()           # everything finished: nothing runs, all rows back
    assert len(engine_prompts) == before
    pd.testing.assert_frame_equal(again.loc[df.index], result)


def test_sampled_rows_resume_to_the_same_completions_as_an_undisturbed_run(model, tmp_path, monkeypatch):
    df, folder = rows(seed=1), tmp_path / "ckpt"
    sampled = {"temperature": 1.0, "seed": 11}
    with dask.config.set(scheduler="sync"):
        undisturbed = to_dask(df, 3).llm.generate("prompt", model, npartitions=2, **{**SAMPLING, **sampled},
                                                  **ENGINE).compute()
        with monkeypatch.context() as m:
            interrupt_after_first_part(m, str(folder))
            with pytest.raises(RuntimeError):
                job(df, model, folder, **sampled).compute()
        resumed = job(df, model, folder, **sampled).compute()
    assert resumed.loc[df.index, "completion"].fillna("").tolist() == \
        undisturbed.loc[df.index, "completion"].fillna("").tolist()


def test_a_partial_part_is_never_taken_as_finished(model, tmp_path, engine_prompts):
    df, folder = rows(n_groups=1, size=4), tmp_path / "ckpt"
    with dask.config.set(scheduler="sync"):
        job(df, model, folder).compute()
    parts = sorted(glob.glob(str(folder / "part-*.parquet")))
    victim = parts[0]
    keys = pd.read_parquet(victim).index
    # What a worker killed while writing leaves: the temporary file, cut short, beside no renamed part.
    with open(victim, "rb") as f:
        half = f.read()[: os.path.getsize(victim) // 2]
    os.remove(victim)
    with open(os.path.join(folder, f".{part_name(keys)}.deadbeef.tmp"), "wb") as f:
        f.write(half)
    before = len(engine_prompts)
    with dask.config.set(scheduler="sync"):
        result = job(df, model, folder).compute()
    runnable = df.loc[keys, "prompt"].map(lambda p: p is not None and len(p) > 0).sum()
    assert len(engine_prompts) - before == runnable      # exactly the lost part's rows ran again
    assert len(result) == len(df) and result.index.is_unique
    assert len(pd.read_parquet(folder)) == len(df)       # the temporary file is not read as a part


def test_resuming_with_other_settings_is_refused_naming_them(model, tiny_qwen_dir, tmp_path):
    df, folder = rows(n_groups=1, size=3), tmp_path / "ckpt"
    with dask.config.set(scheduler="sync"):
        job(df, model, folder).compute()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["sampling"]["max_tokens"] == 4 and manifest["engine"] == {"dtype": "float32"}
    assert manifest["model"]["files"]["model.safetensors"]["size"] > 0 and "hidden_size" in manifest["model"]["config"]
    for change, words in [({"temperature": 0.5}, ["temperature", "0.0 in the checkpoint, 0.5 now"]),
                          ({"max_tokens": 5}, ["max_tokens", "4 in the checkpoint, 5 now"]),
                          ({"dtype": "bfloat16"}, ["dtype", "'float32' in the checkpoint, 'bfloat16' now"]),
                          ({"output_col": "answer"}, ["output_col"])]:
        with pytest.raises(ValueError) as err:
            job(df, model, folder, **change)
        assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(ValueError, match=r"model\.(config|files)"):
        job(df, str(tiny_qwen_dir), folder)
    with pytest.raises(ValueError, match="prompt_col"):
        to_dask(df.rename(columns={"prompt": "p"}), 2).llm.generate("p", model, checkpoint=str(folder), **SAMPLING,
                                                                    **ENGINE)
    # how the engine runs is not what it computes: a resume with another KV pool or batch budget is fine
    job(df, model, folder, kv_cache_bytes=16 << 20, max_num_batched_tokens=64)


def test_a_duplicated_index_a_pandas_frame_or_a_foreign_folder_are_clear_errors(model, tmp_path):
    df = rows(n_groups=1, size=3)
    with pytest.raises(ValueError, match="index .*unique"):
        job(df.set_axis(["same"] * len(df)), model, tmp_path / "a")
    with pytest.raises(TypeError, match="checkpoint: needs a Dask"):
        df.llm.generate("prompt", model, checkpoint=str(tmp_path / "b"), **SAMPLING)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        job(df, model, tmp_path / "c")


def test_the_command_line_resumes_by_row_number(model, tmp_path, capsys, engine_prompts):
    df = pd.DataFrame({"id": range(10), "prompt": [f"Item {i}: " + "describe it. " * 4 for i in range(10)]})
    df.to_csv(tmp_path / "in.csv", index=False)
    argv = ["generate", str(tmp_path / "in.csv"), str(tmp_path / "out.jsonl"), "--model", model,
            "--scheduler", "threads", "--no-progress", "--checkpoint", str(tmp_path / "ckpt"),
            "--partition-tokens", "80", "--npartitions", "1", "--max-tokens", "3", "--temperature", "0",
            "--dtype", "float32", "--device", "cpu"]
    assert cli.main(argv) == 0
    first = pd.read_json(tmp_path / "out.jsonl", lines=True).sort_values("id")
    assert first["id"].tolist() == list(range(10)) and len(pd.read_parquet(tmp_path / "ckpt")) == 10
    assert len(engine_prompts) == 10
    capsys.readouterr()
    assert cli.main(argv) == 0                            # run again: everything is read back
    assert len(engine_prompts) == 10
    again = pd.read_json(tmp_path / "out.jsonl", lines=True).sort_values("id")
    pd.testing.assert_frame_equal(again.reset_index(drop=True), first.reset_index(drop=True))
    assert "rows                   10 (10 completed" in capsys.readouterr().out


def test_a_json_schema_job_resumes_with_its_typed_field_columns(model, tmp_path, monkeypatch):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "integer"}},
              "required": ["ok", "score"]}
    df, folder = rows(n_groups=2, size=3, seed=2), tmp_path / "ckpt"
    opts = {"json_schema": schema, "max_tokens": 12}
    with dask.config.set(scheduler="sync"):
        undisturbed = to_dask(df, 2).llm.generate("prompt", model, npartitions=1, partition_tokens=150,
                                                  **{**SAMPLING, **opts}, **ENGINE).compute()
        with monkeypatch.context() as m:
            interrupt_after_first_part(m, str(folder))
            with pytest.raises(RuntimeError):
                job(df, model, folder, **opts).compute()
        resumed = job(df, model, folder, **opts).compute()
    assert list(resumed.columns) == list(undisturbed.columns) and {"ok", "score"} <= set(resumed.columns)
    pd.testing.assert_frame_equal(resumed.loc[df.index].drop(columns="cached_tokens"),
                                  undisturbed.loc[df.index].drop(columns="cached_tokens"))


def test_a_partition_recorded_twice_replaces_its_part(tmp_path):
    from batchllm_dask.checkpoint import record_partition
    part = pd.DataFrame({"completion": ["a", "b", None], "x": [1, 2, 3]},
                        index=pd.Index(["k1", "k2", "k3"], name="rid"))
    assert part_name(part.index) == part_name(part.index[::-1]) != part_name(part.index[:2])
    record_partition(part, str(tmp_path), ["completion"])
    record_partition(part.iloc[::-1], str(tmp_path), ["completion"])  # a re-run after a worker loss, rows reordered
    assert len(glob.glob(str(tmp_path / "part-*.parquet"))) == 1 and not glob.glob(str(tmp_path / ".*"))
    back = pd.read_parquet(tmp_path)
    assert sorted(back.index) == ["k1", "k2", "k3"] and list(back.columns) == ["completion"]
