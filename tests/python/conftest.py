import os

import pytest
from hypothesis import HealthCheck, settings

# CI runs are derandomized (the same examples every run, no example database), so a red run
# replays as is; a failing example is printed with its reproduce blob.
settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (the accuracy, merging and federated studies, "
                          "the Flower deployment; CI runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="a study of minutes: run with --slow (bash .ci/test --slow; CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
