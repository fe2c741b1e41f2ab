"""The examples, the command line and the Dask benchmark's logic, run for real on tiny models."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from batchllm_dask import cli

ROOT = Path(__file__).resolve().parent.parent


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_etl_script_writes_every_review_with_its_answer(tiny_llama_dir, tmp_path, capsys):
    etl = load_module(ROOT / "examples" / "etl_reviews.py")
    answers_path = etl.main(["--model", str(tiny_llama_dir), "--rows", "24", "--max-tokens", "4",
                             "--npartitions", "2", "--workdir", str(tmp_path)])
    reviews = pd.read_parquet(tmp_path / "reviews.parquet")
    answers = pd.read_parquet(answers_path).sort_index()
    assert list(answers.index) == list(reviews.index) and answers.index.name == "review_id"
    pd.testing.assert_frame_equal(answers[reviews.columns], reviews, check_dtype=False)
    assert (answers["finish_reason"] != "error").all() and (answers["completion_tokens"] > 0).all()
    assert "prompt" not in answers.columns
    assert "24 reviews labelled" in capsys.readouterr().out


def test_notebook_cells_run_in_order(tmp_path, monkeypatch):
    notebook = json.loads((ROOT / "examples" / "etl_reviews.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for source in cells:
        exec(compile(source, "etl_reviews.ipynb", "exec"), namespace)  # noqa: S102 - our own notebook
    result = namespace["result"]
    assert len(result) == namespace["ROWS"] and (result["completion_tokens"] > 0).all()


def test_cli_generate_reads_and_writes_parquet(tiny_llama_dir, tmp_path, capsys):
    rows = pd.DataFrame({"prompt": ["Shared instructions. Review: fine.", "Shared instructions. Review: bad.", ""]})
    rows.to_parquet(tmp_path / "in.parquet")
    code = cli.main(["generate", str(tmp_path / "in.parquet"), str(tmp_path / "out"), "--model", str(tiny_llama_dir),
                     "--max-tokens", "3", "--temperature", "0", "--dtype", "float32", "--device", "cpu"])
    out = pd.read_parquet(tmp_path / "out").sort_index()
    assert code == 0 and len(out) == 3
    assert out["finish_reason"].tolist()[:2] != ["error", "error"] and out["finish_reason"].iloc[2] == "error"
    assert "rows                   3 (2 completed, 1 errors)" in capsys.readouterr().out


def test_cli_demo_runs_the_default_model_and_prints_throughput(capsys):
    assert cli.main(["demo", "--rows", "12", "--max-tokens", "3", "--npartitions", "2"]) == 0
    out = capsys.readouterr().out
    assert "12 rows through ddf.llm.generate" in out and "tokens/s" in out


def test_bench_dask_tiny_runs_both_paths_in_pairs_and_writes_json(tmp_path):
    from batchllm_dask.bench import dask_layer
    report = dask_layer.main(["--tiny", "--scale", "0.05", "--repeats", "2", "--out", str(tmp_path)])
    (saved_file,) = tmp_path.glob("bench_dask_*.json")
    assert json.loads(saved_file.read_text()) == json.loads(json.dumps(report))
    direct = report["direct"]
    assert direct["complete"] and len(direct["all_seconds"]) == 2
    assert set(report["dask"]) == {"parquet", "memory"}
    for run in report["dask"].values():
        assert run["complete"] and run["engine_loads"] == 1 and len(run["all_seconds"]) == 2
        assert run["pair_ratios"] == pytest.approx([d / s for d, s in zip(direct["all_seconds"], run["all_seconds"])])
        assert all(e > 0 for e in run["engine_seconds"])
        assert run["rest_seconds"] == pytest.approx([t - e for t, e in zip(run["all_seconds"], run["engine_seconds"])])


def test_device_setup_script_names_every_wheel_the_device_lacks():
    script = (ROOT / "benchmarks" / "device_setup.sh").read_text()
    for name in ("dask", "distributed", "partd", "locket", "tblib", "zict", "tornado"):
        assert name in script
