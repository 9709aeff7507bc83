"""Every ``python`` code block of the guides (docs/*.md and README.md) runs, so the documentation cannot rot.

Each page's blocks run in order in one namespace, seeded with the names a guide takes as given
(`tests.docs.doc_context.namespace`: the user's module, loaders, loop) and, for a few pages, the lines of
``PAGE_SETUP`` below. Trainers run two CPU steps (`doc_context.fast_trainer`). A block that cannot run here carries
an HTML comment ``<!-- not run: why -->`` on the line before it; those are listed by a test of their own, which
fails when one has no reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.docs.doc_context import fast_trainer, namespace

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")

#: Lines that stand in what a page's text says a block is given (a wrapped model, a process group).
PAGE_SETUP = {
    "own-data.md": (
        "from distprobe.loop import ProbeSet\n"
        "model, optimizer = _wrapped, _wrapped_optimizer\n"
        "probes = ProbeSet.build([{'name': 'linear', 'probe': nn.Linear(768, 1000), 'input': 'embedding',"
        " 'target': 'label'}])\n"
    ),
    "monitors.md": (
        "import torch.distributed as dist\n"
        "loader = [{'views': torch.randn(8, 3, 16)} for _ in range(2)]\n"
        "model = nn.Linear(16, 768)\n"
        "dist.init_process_group('gloo', init_method=f'file://{path}.store', rank=0, world_size=1)\n"
    ),
    "knn.md": "from distprobe.loop import ProbeSet\n",
}


def blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, reason it is not run or None)`` for each python block of a page."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        found.append((line, match.group(1), reason.group(1) if reason else None))
    return found


RUNNABLE = [page for page in PAGES if any(reason is None for _, _, reason in blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_every_python_block_of_the_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a block that writes (a checkpoint, logs) writes here
    scope = namespace(tmp_path)
    exec(PAGE_SETUP.get(page.name, ""), scope)  # noqa: S102 - the test's own setup lines
    with fast_trainer():
        for line, code, reason in blocks(page):
            if reason is None:
                exec(compile(code, f"{page.name}:{line}", "exec"), scope)  # noqa: S102 - the guide's own code


def test_the_blocks_that_do_not_run_say_why_and_are_few() -> None:
    skipped = [(page.name, line, reason) for page in PAGES for line, _, reason in blocks(page) if reason]
    assert all(reason.strip() for _, _, reason in skipped)
    total = sum(len(blocks(page)) for page in PAGES)
    assert total >= 15, f"only {total} python blocks found: is the block pattern still right?"
    assert len(skipped) <= 4, skipped
