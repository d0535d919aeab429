"""The mutation check (``python -m tests.mutants``, not run in CI) stays aimed: every planted
bug's text is in its file exactly once, and every test it names exists, so moving or editing
code cannot leave a mutant that silently plants nothing."""

from __future__ import annotations

import re

from tests.mutants import MUTANTS, REPO


def test_every_mutant_plants_its_bug_once_and_names_tests_that_exist():
    assert len(MUTANTS) >= 27
    for m in MUTANTS:
        assert (REPO / m.file).read_text().count(m.old) == 1, (m.name, m.file)
        for node in m.tests:
            path, _, name = node.partition("::")
            text = (REPO / path).read_text()
            assert not name or re.search(rf"^def {re.escape(name)}\(", text, re.M), (m.name,
                                                                                   node)
