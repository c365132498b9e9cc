"""The command line: the build path stays free of torch, and check-isolation runs for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sftpack.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"


def test_build_and_inspect_never_import_torch_or_transformers(tmp_path):
    code = (
        "import sys, sftpack, sftpack.cli\n"
        f"assert sftpack.cli.main(['build', {str(SAMPLE)!r}, '--out', {str(tmp_path / 's')!r}, "
        "'--seq-length', '64', '--quiet']) == 0\n"
        f"assert sftpack.cli.main(['inspect', {str(tmp_path / 's')!r}, '--row', '1']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_check_isolation_command_passes_on_a_boundaries_store(tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["build", str(SAMPLE), "--out", str(store), "--seq-length", "64", "--boundaries",
                 "--no-train-on-prompt", "--quiet"]) == 0
    assert main(["check-isolation", str(store), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "isolation check PASSED" in out and "rows checked:      3" in out


def test_check_isolation_command_fails_when_the_tolerance_is_impossible(tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["build", str(SAMPLE), "--out", str(store), "--seq-length", "64", "--quiet"]) == 0
    assert main(["check-isolation", str(store), "--rows", "2", "--atol", "-1"]) == 1
    assert "isolation check FAILED" in capsys.readouterr().out


def test_missing_store_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err
