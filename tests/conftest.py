"""Under CI (CI=true) a skipped test fails the run: a missing browser or package must not turn the suite green."""

import os

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI", "").lower() == "true" and _skipped and session.exitstatus == 0:
        print(f"\nCI=true: {len(_skipped)} test(s) were skipped, which CI does not allow "
              f"(install what they need; tests/run.sh does): {', '.join(_skipped[:10])}")
        session.exitstatus = 1
