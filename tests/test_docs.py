"""The README and ``docs/``: short enough to read, links that resolve, and every command block
tied to what runs it: a test that runs its commands (named in a marker comment just above the
block, and checked to exist), or a marker saying what it needs that the suite cannot have (a
real cluster or bucket). Every ``houseprice`` line must also parse with the real CLI parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- (run by|needs): (.*?) -->\n)?```(bash|sh)\n(.*?)```", re.S)


def _blocks():
    for page in PAGES:
        for m in BLOCK.finditer(page.read_text()):
            yield page.relative_to(ROOT), m.group(1), m.group(2), m.group(4)


def test_the_readme_is_a_page_a_newcomer_reads():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    text = "\n".join(lines)
    assert text.index("## Quickstart") < text.index("## What a run shows") < text.index(
        "## Documentation")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            assert anchor in slugs, f"{page.name}: no heading for #{anchor} in {dest.name}"


def test_every_command_block_is_run_by_a_test_or_says_what_it_needs():
    blocks = list(_blocks())
    assert len(blocks) >= 9
    for page, how, what, _ in blocks:
        assert how, f"{page}: a command block without a 'run by' or 'needs' marker"
        if how == "needs":
            assert re.search(r"cluster|bucket|machine", what), what
            continue
        for ref in what.split(", "):
            file, _, name = ref.partition("::")
            source = ROOT / file
            assert source.exists(), f"{page}: {file} does not exist"
            found = (re.search(rf"^def {re.escape(name)}\(", source.read_text(), re.M)
                     if file.endswith(".py") else name in source.read_text())
            assert found, f"{page}: {ref} does not exist"


def _houseprice_lines(block: str) -> list[list[str]]:
    out = []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith(".venv/bin/houseprice "):
            line = line.removeprefix(".venv/bin/")
        if not line.startswith("houseprice "):
            continue
        line = re.split(r"\s+#\s", line)[0].split(" | ")[0].rstrip(" &")
        out.append(shlex.split(line)[1:])
    return out


def test_every_houseprice_line_in_the_docs_parses():
    from flows.cli import _parser

    lines = [args for *_, block in _blocks() for args in _houseprice_lines(block)]
    assert len(lines) >= 20
    for args in lines:
        try:
            _parser().parse_args(args)
        except SystemExit as exc:
            if exc.code:  # --version exits 0
                raise AssertionError(f"houseprice {' '.join(args)}: does not parse") from None
