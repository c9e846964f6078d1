"""Executes a notebook in place with nbclient: `python -m experiments.run_notebook PATH [--small]`.

`--small` sets TANDEM_NOTEBOOK_SMALL=1 (the sizes CI uses).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: str | Path, small: bool = False, timeout: int = 1800, write: bool = True):
    """Runs every cell (cwd = the notebook's folder); returns the executed notebook."""
    path = Path(path)
    if small:
        os.environ["TANDEM_NOTEBOOK_SMALL"] = "1"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    if write:
        nbformat.write(nb, path)
    return nb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    execute(args.path, small=args.small)
    print(f"executed {args.path}")


if __name__ == "__main__":
    main()
