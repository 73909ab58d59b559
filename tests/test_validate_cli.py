"""`kubeci validate`: exit codes, text and JSON output, and the pre-commit hook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines_schema.validate import main

VALID = """\
jobs:
  - name: build
    steps:
      - name: test
        tasks:
          - name: unit
            action: kubernetes_job
            arguments: {image: "python:3.12", command: [pytest]}
"""
INVALID = VALID.replace("kubernetes_job", "kubernetes-job").replace(
    "name: unit", "name: u\n            retries: x"
)
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / ".kubeci.yml"
    path.write_text(VALID, encoding="utf-8")
    return path


@pytest.fixture
def invalid_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad" / ".kubeci.yml"
    path.parent.mkdir()
    path.write_text(INVALID, encoding="utf-8")
    return path


def test_valid_file_exit_zero(valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([str(valid_file)])
    output = capsys.readouterr()
    assert status == 0
    assert output.out == f"{valid_file}: valid\n"
    assert output.err == ""


def test_invalid_file_text(invalid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([str(invalid_file)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    assert lines == [
        f"{invalid_file}:7:22: jobs[0].steps[0].tasks[0].retries: "
        "retries must be an integer, got string 'x'",
        f"{invalid_file}:8:21: jobs[0].steps[0].tasks[0].action: unknown action "
        "'kubernetes-job'; expected one of webhook, kubernetes_job, kubernetes_deployment",
    ]


def test_invalid_file_json(invalid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([str(invalid_file), "--format", "json"])
    records = json.loads(capsys.readouterr().out)
    assert status == 1
    assert records[1] == {
        "file": str(invalid_file),
        "line": 8,
        "column": 21,
        "path": "jobs[0].steps[0].tasks[0].action",
        "message": "unknown action 'kubernetes-job'; expected one of webhook, kubernetes_job, "
        "kubernetes_deployment",
    }
    assert len(records) == 2


def test_valid_file_json_empty(valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--format=json", str(valid_file)])
    assert status == 0
    assert json.loads(capsys.readouterr().out) == []


def test_several_files(
    valid_file: Path, invalid_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([str(valid_file), str(invalid_file)])
    output = capsys.readouterr().out
    assert status == 1
    assert f"{valid_file}: valid" in output
    assert f"{invalid_file}:8:21:" in output


def test_missing_file_exit_two(
    tmp_path: Path, valid_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yml"
    status = main([str(missing), str(valid_file)])
    output = capsys.readouterr()
    assert status == 2
    assert output.err == f"kubeci validate: cannot read {missing}: No such file or directory\n"
    assert f"{valid_file}: valid" in output.out


def test_directory_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([str(tmp_path)])
    assert status == 2
    assert f"cannot read {tmp_path}" in capsys.readouterr().err


def test_no_arguments_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    status = main([])
    error = capsys.readouterr().err
    assert status == 2
    assert "usage: kubeci validate" in error
    assert "the following arguments are required: FILE" in error


def test_unknown_format_exit_two(valid_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([str(valid_file), "--format", "xml"])
    assert status == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_help_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--help"])
    assert status == 0
    assert "--format" in capsys.readouterr().out


def test_oversized_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.yml"
    path.write_bytes(b"#" * (2 * 1024 * 1024))
    status = main([str(path)])
    assert status == 1
    assert "over the limit of 1048576 bytes" in capsys.readouterr().out


def test_invalid_utf8_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes("jobs: café\n".encode("latin-1"))
    status = main([str(path)])
    assert status == 1
    assert f"{path}:1:10: the file is not valid UTF-8" in capsys.readouterr().out


def test_nul_escape_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / ".kubeci.yml"
    path.write_text(VALID.replace("[pytest]", '[pytest, "-k\\0"]'), encoding="utf-8")
    status = main([str(path)])
    output = capsys.readouterr().out
    assert status == 1
    assert f"{path}:8:" in output
    assert "arguments.command[1]: invalid character U+0000" in output


@pytest.mark.slow
def test_module_entry_point_stdin() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines_schema", "-", "--format", "json"],
        input=INVALID.encode(),
        capture_output=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
        check=False,
    )
    records = json.loads(result.stdout)
    assert result.returncode == 1
    assert [record["file"] for record in records] == ["<stdin>", "<stdin>"]


def test_pre_commit_hook() -> None:
    hooks = yaml.safe_load((REPO_ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    hook = hooks[0]
    pattern = re.compile(hook["files"])
    assert hook["id"] == "kubeci-validate"
    assert hook["entry"] == "kubeci validate"
    assert pattern.search(".kubeci.yml")
    assert pattern.search("services/api/.kubeci.yaml")
    assert not pattern.search("my.kubeci.yml")
    assert not pattern.search(".kubeci.yml.bak")
