"""Before anything runs (tests and the notebooks under nbval, whose kernels inherit this environment): the figures
the labs record (``workshop_lib.bench.record``) go to a temporary folder, never to the learner's home."""

import os
import shutil
import tempfile

_created = []


def pytest_configure(config):
    if os.environ.get("WORKSHOP_RESULTS"):
        return
    folder = tempfile.mkdtemp(prefix="workshop-results-")
    _created.append(folder)
    os.environ["WORKSHOP_RESULTS"] = os.path.join(folder, "results.json")


def pytest_unconfigure(config):
    while _created:
        os.environ.pop("WORKSHOP_RESULTS", None)
        shutil.rmtree(_created.pop(), ignore_errors=True)
