import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

_SKIPPED = []  # tests that did not run although nothing marks them optional


def pytest_configure(config):
    config.addinivalue_line("markers", "optional: a suite that may skip where its hardware is missing (a GPU); "
                                       "any other skipped test fails the run")


def pytest_runtest_logreport(report):
    if report.skipped and "optional" not in report.keywords:
        _SKIPPED.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Everything CI installs is a requirement: a skip means a feature went untested, so the run fails."""
    if _SKIPPED and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED:
        terminalreporter.write_sep("=", f"FAILED: {len(_SKIPPED)} test(s) skipped without an 'optional' mark "
                                        "(install what is missing: see .ci/run)", red=True)
        for nodeid in _SKIPPED:
            terminalreporter.write_line(nodeid)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def svc():
    """The app's service on the embedded model, built once per process (tests/app_support.py)."""
    import app_support

    return app_support.get_service()
