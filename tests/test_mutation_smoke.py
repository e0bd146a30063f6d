"""tools/mutation_smoke.py stays usable: every mutation's snippet occurs exactly once in its file, each changes it,
and the tests it names exist in the default (not slow) run."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke():
    spec = importlib.util.spec_from_file_location("mutation_smoke", ROOT / "tools" / "mutation_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


smoke = _smoke()


@pytest.mark.parametrize("mutation", smoke.MUTATIONS, ids=lambda m: m.name)
def test_mutation_snippet_occurs_exactly_once_and_names_default_tests(mutation):
    text = (ROOT / mutation.path).read_text()
    assert text.count(mutation.original) == 1, f"{mutation.name}: snippet not exactly once in {mutation.path}"
    assert mutation.replacement != mutation.original and mutation.path.startswith("src/")
    assert mutation.tests
    for arg in mutation.tests:
        file, _, name = arg.partition("::")
        assert file.startswith("tests/test_") and (ROOT / file).is_file(), arg
        if name:  # a node id: the test is defined there and not marked slow
            source = (ROOT / file).read_text()
            match = re.search(rf"((?:^@.*\n)*)^def {re.escape(name)}\(", source, re.M)
            assert match, f"{arg}: no such test"
            assert "pytest.mark.slow" not in match.group(1), f"{arg} is slow: the smoke run skips it"


def test_stale_reports_a_missing_or_repeated_snippet(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\nx = 1\ny = 2\n")
    cases = [smoke.Mutation(n, "a.py", s, "z", ("tests/test_x.py",)) for n, s in (("twice", "x = 1"), ("gone", "q"))]
    cases.append(smoke.Mutation("once", "a.py", "y = 2", "y = 3", ("tests/test_x.py",)))
    assert smoke.stale(tuple(cases), tmp_path) == [
        "twice: snippet occurs 2 times in a.py (must be exactly once)",
        "gone: snippet occurs 0 times in a.py (must be exactly once)",
    ]


def test_smoke_is_outside_the_default_collection():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^testpaths = \["tests"\]', pyproject, re.M)
    assert (ROOT / "tools" / "mutation_smoke.py").is_file() and not (ROOT / "tools" / "conftest.py").exists()
