"""How `scripts/test.sh` spreads the suite over its two xdist workers (tests/conftest.py): the trainer launches
are one unit, a file whose tests share a module-scoped set-up is one unit (built once, not once per worker),
and every other test is its own unit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest

pytestmark = pytest.mark.unit


def _scope(tmp_path: Path, nodeid: str) -> str:
    config = SimpleNamespace(rootpath=tmp_path, getvalue={"tx": ["2*popen"]}.get)  # what `-n 2` sets
    scheduler = conftest.pytest_xdist_make_scheduler(config, None)
    return scheduler._split_scope(nodeid)


def test_trainer_launches_are_one_unit_shared_set_ups_one_per_file_the_rest_one_per_test(tmp_path):
    suite = tmp_path / "suite"  # a test folder of its own (these files exist only here)
    suite.mkdir()
    (suite / "test_shared.py").write_text('@pytest.fixture(scope="module")\ndef runs(): ...\n')
    (suite / "test_engine.py").write_text("def test_a(verl_cpu): ...\n")
    (suite / "test_plain.py").write_text("@pytest.fixture\ndef x(): ...\n")
    for name in conftest.E2E_SERIAL:
        assert _scope(tmp_path, f"suite/{name}::test_x[a]") == "e2e-serial"
    assert _scope(tmp_path, "suite/test_shared.py::test_a[eopd]") == "suite/test_shared.py"
    assert _scope(tmp_path, "suite/test_shared.py::test_b") == "suite/test_shared.py"
    assert _scope(tmp_path, "suite/test_engine.py::test_a") == "suite/test_engine.py"
    assert _scope(tmp_path, "suite/test_plain.py::test_a[1]") == "suite/test_plain.py::test_a[1]"
    assert _scope(tmp_path, "suite/test_gone.py::test_a") == "suite/test_gone.py::test_a"  # unreadable: per test


def test_the_real_files_with_shared_set_ups_are_grouped():
    root = Path(conftest.__file__).resolve().parents[1]
    assert conftest._shares_module_setup(root / "tests" / "test_rank_equivalence.py")  # two launches of 3 ranks
    assert conftest._shares_module_setup(root / "tests" / "test_verl_engine.py")  # verl_cpu and a module fixture
    assert not conftest._shares_module_setup(root / "tests" / "test_losses.py")
