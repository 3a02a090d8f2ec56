"""pytest plugin of `make gpu-check`: one JSON line per test phase outcome, written as it happens.

    FASTDIFF_PYTEST_ROWS=rows.jsonl PYTHONPATH=tools pytest -p pytest_rows ...

Lines are flushed one by one, so a run killed at its time budget keeps every result so far
(a JUnit file is written only at the end). Under pytest-xdist only the controller writes.
Each line: nodeid, when (collect/setup/call/teardown), outcome (passed/failed/skipped/error),
duration in seconds, and for failures and skips the message (its last 2000 characters). One line
{"collection": {"selected": [...], "gpu_marked": [...]}} when collection ends: the node ids run,
and every `gpu`-marked one collected before -k/-m deselection (not written under xdist, whose
controller does not collect).
"""
from __future__ import annotations

import json
import os

import pytest

_state = {"file": None, "gpu_marked": []}


def pytest_configure(config):
    path = os.environ.get("FASTDIFF_PYTEST_ROWS")
    if path and not hasattr(config, "workerinput"):  # xdist workers report to the controller
        _state["file"] = open(path, "a", buffering=1)


def pytest_unconfigure(config):
    if _state["file"] is not None:
        _state["file"].close()
        _state["file"] = None


def _write(row: dict) -> None:
    if _state["file"] is not None:
        _state["file"].write(json.dumps(row) + "\n")
        _state["file"].flush()


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, reason)
        return str(report.longrepr[2])
    return str(report.longrepr or "")[-2000:]


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect anything
def pytest_collection_modifyitems(session, config, items):
    _state["gpu_marked"] = [item.nodeid for item in items if item.get_closest_marker("gpu") is not None]


def pytest_collection_finish(session):
    _write({"collection": {"selected": [item.nodeid for item in session.items], "gpu_marked": _state["gpu_marked"]}})


def pytest_collectreport(report):
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "error", "duration": 0.0, "message": _message(report)})


def pytest_runtest_logreport(report):
    outcome = report.outcome
    if report.when != "call" and outcome == "failed":
        outcome = "error"  # a fixture's failure, as pytest counts it
    if report.when == "call" or outcome != "passed":
        row = {"nodeid": report.nodeid, "when": report.when, "outcome": outcome, "duration": round(report.duration, 4)}
        if outcome != "passed":
            row["message"] = _message(report)
        _write(row)
