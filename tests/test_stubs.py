"""The hand-written stubs (controlplane/_core.pyi, sim/_native.pyi) against the compiled modules: mypy's
stubtest, with the differences that pybind11 bindings always have filtered out (their metaclass, read-only
properties the stubs write as attributes, the enum machinery, pybind11's `*args` on some __init__), so
that what is left is what matters: a name the stub has and the module lacks or the other way round, a
signature or a type that differs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ("controlplane._core", "sim._native")

# stubtest messages that pybind11's way of binding produces for a correct stub
BENIGN = (
    re.compile(r" is inconsistent, metaclass differs"),
    re.compile(r" is read-only at runtime but not in (the )?stub"),
    re.compile(r"\.__init__ is inconsistent, stub does not have \*args"),
    re.compile(r"\.(__index__|__int__|__members__|name|value) is not present in (the )?stub"),
)


def stubtest_errors(*extra: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", *MODULES, "--concise", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not lines):
        pytest.fail(f"stubtest did not run (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return [ln for ln in lines if not any(p.search(ln) for p in BENIGN)]


def test_the_stubs_match_the_compiled_modules():
    pytest.importorskip("mypy")
    errors = stubtest_errors()
    assert not errors, "stubs and compiled modules differ:\n" + "\n".join(errors)


def test_stubtest_sees_a_name_the_module_lacks(tmp_path):
    """The check can fail: a stub naming a function the module does not have is reported."""
    pytest.importorskip("mypy")
    pkg = tmp_path / "controlplane"
    pkg.mkdir()
    stub = (REPO / "controlplane" / "_core.pyi").read_text() + "\ndef no_such_function(x: int) -> int: ...\n"
    (pkg / "_core.pyi").write_text(stub)
    (pkg / "__init__.pyi").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "controlplane._core", "--concise"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
    )  # this stub is found first
    assert "controlplane._core.no_such_function is not present at runtime" in proc.stdout, proc.stdout[-2000:]
