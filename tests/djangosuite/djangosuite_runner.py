"""A DiscoverRunner that records every test's outcome in a JSON file.

Django's ``runtests.py`` takes its runner from ``settings.TEST_RUNNER``; this
one writes ``{test id: outcome}`` to ``$DJANGOSUITE_RESULTS`` so that runs on
two engines can be compared test by test. It works with ``--parallel``: the
parallel suite replays each worker's events on the parent's result object.
"""

from __future__ import annotations

import json
import os
import unittest
from typing import Any

from django.test.runner import (
    DiscoverRunner,
    ParallelTestSuite,
    RemoteTestResult,
    RemoteTestRunner,
)


class RecordingResult(unittest.TextTestResult):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}

    def _record(self, test: Any, outcome: str, err: Any = None) -> None:
        test_id = test.id()
        # A failing subtest marks its test failed; a later success must not undo it.
        if self.outcomes.get(test_id) in ("failure", "error") and outcome == "passed":
            return
        self.outcomes[test_id] = outcome
        if err is not None and outcome in ("failure", "error"):
            try:
                self.details[test_id] = self._exc_info_to_string(err, test)[-3000:]
            except Exception:  # a replayed remote traceback is already text
                self.details[test_id] = repr(err)[-3000:]

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._record(test, "passed")

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._record(test, "error", err)

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._record(test, "failure", err)

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped")

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "expected failure")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected success")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(test, "failure" if failed else "error", err)


class InStepRemoteResult(RemoteTestResult):
    """Django's worker-side result, kept in step with skipped tests.

    Since Python 3.12 a skipped test reports ``addSkip`` without
    ``startTest``; Django's parallel runner numbers tests by ``startTest``,
    so the parent would pin the skip, and every later outcome of that
    worker's chunk, on the wrong test. Starting the skipped test first keeps
    the numbering, and so the recorded ids, right.
    """

    _current: Any = None

    def startTest(self, test: Any) -> None:
        self._current = test
        super().startTest(test)

    def stopTest(self, test: Any) -> None:
        super().stopTest(test)
        self._current = None

    def addSkip(self, test: Any, reason: str) -> None:
        if self._current is test:
            super().addSkip(test, reason)
            return
        self.startTest(test)
        super().addSkip(test, reason)
        self.stopTest(test)


class InStepRemoteRunner(RemoteTestRunner):
    resultclass = InStepRemoteResult


class InStepParallelSuite(ParallelTestSuite):
    runner_class = InStepRemoteRunner


class RecordingRunner(DiscoverRunner):
    parallel_test_suite = InStepParallelSuite

    def get_resultclass(self) -> Any:
        return super().get_resultclass() or RecordingResult

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        result = super().run_suite(suite, **kwargs)
        path = os.environ.get("DJANGOSUITE_RESULTS")
        if path and isinstance(result, RecordingResult):
            with open(path, "w") as f:
                json.dump({"outcomes": result.outcomes, "details": result.details}, f, indent=0)
        return result
