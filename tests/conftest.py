import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))  # the helpers, imported by module name (support/__init__)
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
def one_thread():
    """torch on one thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny
    models run fastest on one, and on a busy machine OpenMP threads waiting on each other make them many times
    slower; restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_service():
    """Tests that build their own Service (or run app.py's main) put torch's thread count back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def svc():
    """The app's service on the embedded model, built once per process (tests/support/app_support.py)."""
    import app_support

    return app_support.get_service()


@pytest.fixture(scope="module")
def server(svc):
    """The app launched once per process over `svc` (tests/support/app_support.py)."""
    import app_support

    return app_support.get_server()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    """A scene of the embedded model's world, written as an upload."""
    import app_support as S

    _, im = S.scene(0)
    return S.write(tmp_path_factory.mktemp("scene"), "scene.png", S.png_bytes(im))
