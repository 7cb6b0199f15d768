"""pytest plugin of bench/gpu_check.py (loaded with `-p gpu_check_plugin`, bench/ on sys.path).

--gc-results FILE  one JSON line per test event: {"nodeid", "when": start|setup|call|teardown,
                   "outcome", "duration", "message"}; gpu_check.py turns them into the report's
                   outcome table (a test that started but never finished was killed or hung).
--gc-timeout S     per-test limit: SIGALRM raises in the test after S seconds (pytest-timeout may
                   be missing on the GPU machine). A hang inside C code that never returns to
                   Python is caught by gpu_check.py's timeout of the whole pytest process instead.
"""
import json
import signal

import pytest


def pytest_addoption(parser):
    parser.addoption("--gc-results", default="", help="gpu_check: JSON-lines file of test events")
    parser.addoption("--gc-timeout", type=float, default=0.0, help="gpu_check: per-test limit in seconds")


def _write(config, record):
    path = config.getoption("--gc-results")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write(_CONFIG[0], {"nodeid": nodeid, "when": "start"})


def pytest_runtest_logreport(report):
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])  # (file, line, reason)
    elif report.failed:
        message = getattr(report, "longreprtext", "") or str(report.longrepr)
    _write(_CONFIG[0], {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                        "duration": round(report.duration, 3), "message": message[-4000:]})


_CONFIG = [None]


def pytest_configure(config):
    _CONFIG[0] = config


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--gc-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded the per-test limit of {limit:.0f} s (gpu_check)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
