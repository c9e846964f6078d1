"""notebooks/compare_policies.ipynb runs top to bottom at CI sizes and reports every policy on both workloads.

The run (TANDEM_NOTEBOOK_SMALL=1) takes about 50 s on 2 CPU cores, so it is not marked slow.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # not on the GPU machine, where only `-m gpu` runs

from experiments.run_notebook import execute  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_policies.ipynb"
POLICIES = ("fcfs+lru", "fcfs+ttl30", "fcfs+ttl2", "lpm+lru", "lpm+ttl30")
WORKLOADS = ("agentic_coding", "swe_smith")


def _stdout(nb, tag: str) -> str:
    """The printed text of the code cells carrying `tag`."""
    cells = [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")


def _table_rows(text: str) -> dict[str, list[str]]:
    """{workload: first column of each row} from the results-table cell's format_table output."""
    rows: dict[str, list[str]] = {}
    for block in re.split(r"^== ", text, flags=re.M)[1:]:
        header, *lines = block.splitlines()
        workload = header.split(",")[0]
        table = [line.split()[0] for line in lines[2:] if line.strip()]  # skip the header and the dashes
        rows.setdefault(workload, []).extend(table)
    return rows


def test_compare_policies_runs_small_and_reports_every_policy_on_both_workloads(monkeypatch):
    monkeypatch.setenv("TANDEM_NOTEBOOK_SMALL", "1")  # the kernel inherits this process's environment
    nb = execute(NOTEBOOK, write=False)  # raises CellExecutionError if any cell fails

    assert _stdout(nb, "parameters").startswith("size: small")
    assert _table_rows(_stdout(nb, "results-table")) == {w: list(POLICIES) for w in WORKLOADS}
    evidence = _stdout(nb, "evidence")
    for workload in WORKLOADS:
        assert workload in evidence
    claims = re.findall(r"^\s*(\d+) of (\d+) runs", evidence, flags=re.M)
    assert claims and all(int(k) <= int(n) for k, n in claims)
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 3


def test_committed_notebook_carries_full_size_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert _stdout(nb, "parameters").startswith("size: full")
    assert _table_rows(_stdout(nb, "results-table")) == {w: list(POLICIES) * 2 for w in WORKLOADS}  # 2 seeds
    conclusion = [c for c in nb.cells if "conclusion" in c.metadata.get("tags", [])]
    assert len(conclusion) == 1 and "lpm+ttl30" in conclusion[0].source


AGENT_NOTEBOOK = NOTEBOOK.parent / "agent_policies.ipynb"
AGENT_POLICIES = ("fcfs+lru", "fcfs+ttl30", "fcfs+pause", "las+lru", "credit+lru", "las+pause", "credit+pause")


def test_agent_policies_runs_small_and_reports_every_policy_on_both_workloads(monkeypatch):
    monkeypatch.setenv("TANDEM_NOTEBOOK_SMALL", "1")
    nb = execute(AGENT_NOTEBOOK, write=False)
    assert _stdout(nb, "parameters").startswith("size: small")
    assert _table_rows(_stdout(nb, "results-table")) == {w: list(AGENT_POLICIES) for w in WORKLOADS}
    claims = re.findall(r"^\s*(\d+) of (\d+) runs", _stdout(nb, "evidence"), flags=re.M)
    assert len(claims) == 24 and all(int(k) <= int(n) == 1 for k, n in claims)
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 3


def test_committed_agent_notebook_carries_full_size_outputs_and_a_conclusion():
    nb = nbformat.read(AGENT_NOTEBOOK, as_version=4)
    assert _stdout(nb, "parameters").startswith("size: full")
    assert _table_rows(_stdout(nb, "results-table")) == {w: list(AGENT_POLICIES) * 2 for w in WORKLOADS}
    conclusion = [c for c in nb.cells if "conclusion" in c.metadata.get("tags", [])]
    assert len(conclusion) == 1
    for name in ("pause_aware", "session_las", "cache_credit"):
        assert name in conclusion[0].source
