"""The README's examples are code: each ```python block runs as a script and exits 0.

So are those of docs/concepts.md, the page that walks through each idea with
a program (including the scale-out one, which starts a local Dask cluster).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONCEPTS = ROOT / "docs" / "concepts.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL)


BLOCKS = python_blocks(README)
# Fragments that name placeholders (fn, items) illustrate the shape only.
RUNNABLE = [block for block in BLOCKS if "fn, items" not in block]
CONCEPT_BLOCKS = python_blocks(CONCEPTS)
CONCEPT_HEADINGS = (
    "Concurrency vs parallelism",
    "Synchronous vs asynchronous",
    "I/O-bound vs CPU-bound",
    "Processes vs threads, and the GIL",
    "Stopping a thread: a flag, then join",
    "Starting, joining and terminating a process",
    "Pools",
    "Profiling",
    "Scale-up vs scale-out",
)


def test_readme_has_runnable_examples() -> None:
    assert len(RUNNABLE) >= 6


def test_concepts_page_has_one_example_per_idea_and_is_linked() -> None:
    text = CONCEPTS.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert tuple(headings) == CONCEPT_HEADINGS
    # Each idea's section holds exactly one runnable program.
    sections = re.split(r"^## .+$", text, flags=re.MULTILINE)[1:]
    assert [section.count("```python") for section in sections] == [1] * len(CONCEPT_HEADINGS)
    assert "docs/concepts.md" in README.read_text(encoding="utf-8")


def run_block(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("code", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(code: str, tmp_path: Path) -> None:
    run_block(code, tmp_path)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "code", CONCEPT_BLOCKS, ids=[f"concepts{i}" for i in range(len(CONCEPT_BLOCKS))]
)
def test_concepts_example_runs(code: str, tmp_path: Path) -> None:
    run_block(code, tmp_path)
