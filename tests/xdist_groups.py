"""Groups of tests that pytest-xdist must run on one worker each, without ``--dist loadgroup``.

xdist's loadgroup sends a group to one worker by appending "@group" to the test ids its workers
report, which pytest 9.2 no longer allows (the ids are built from structured parts:
pytest-dev/pytest-xdist#1386): the groups are then silently lost. Here the workers write the
groups they collected to a file (``write``), and the controller's scheduler, a loadscope one
whose scopes are those groups (each other test its own scope), reads it when it schedules
(after every worker has collected). Scopes go out largest first, one at a time to the worker
that asks, so the largest groups start at once on different workers.

``start(config)`` in the controller's ``pytest_cmdline_main`` turns it on for a run.
"""
import json
import os
import tempfile

import pytest
from xdist.scheduler import LoadScopeScheduling

ENV = "FASTRNN_TEST_GROUPS"     # the file of {test id: group}, set by the controller


def start(config):
    """In the controller, before xdist starts the workers: run on ``--dist load`` with the
    scheduler below; the workers (which inherit the environment) write the groups to a file
    of this run's own."""
    handle, path = tempfile.mkstemp(prefix="fastrnn-test-groups-", suffix=".json")
    os.close(handle)
    os.environ[ENV] = path
    config.option.dist = "load"
    config.pluginmanager.register(_Controller(path), "fastrnn-test-groups")


def write(items, group_of):
    """In a worker, at collection: the groups of ``items`` (``group_of(item)``, None for a
    test in no group) to the run's file, if the controller asked for one."""
    path = os.environ.get(ENV)
    if not path or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    groups = {item.nodeid: group for item in items
              if (group := group_of(item)) is not None}
    temporary = f"{path}.{os.environ['PYTEST_XDIST_WORKER']}"
    with open(temporary, "w") as f:
        json.dump(groups, f)
    os.replace(temporary, path)       # both workers write the same: whole files only


class GroupScheduling(LoadScopeScheduling):
    """loadscope with the groups of the run's file as scopes."""

    def __init__(self, config, log, path):
        super().__init__(config, log)
        self._path, self._groups = path, None

    def _split_scope(self, nodeid):
        if self._groups is None:    # called once every worker has collected, so written
            with open(self._path) as f:
                self._groups = json.load(f)
        return self._groups.get(nodeid, nodeid)


class _Controller:
    def __init__(self, path):
        self.path = path

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        return GroupScheduling(config, log, self.path)

    def pytest_unconfigure(self, config):
        try:
            os.remove(self.path)
        except OSError:
            pass
