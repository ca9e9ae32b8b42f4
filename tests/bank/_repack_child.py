"""The child-process side of the repack SIGKILL sweep (tests/bank/test_repack.py).

``python _repack_child.py sweep JOBS.json``: for each ``[bank_dir, kill_at, torn]``
job (or ``[bank_dir, kill_at, torn, keyframe]``), fork a worker that runs
``Bank.repack()`` (``repack(keyframe=...)``) on that bank through a
FaultStorage that SIGKILLs the worker just before storage operation
``kill_at`` (a data write at that point first leaves half its bytes behind,
uncommitted, with ``torn``); print ``result <json>`` with each worker's fate.
One interpreter (torch imported once) serves every kill point, as in ``_child.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import weightbank as wb
from tests.bank.faults import FaultStorage
from weightbank.bank.environment import capture_env
from weightbank.storage import LocalStorage


def sweep(jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    capture_env()  # warm the git lookup once, before forking
    results: list[dict[str, Any]] = []
    for bank_dir, kill_at, torn, *keyframe in jobs:
        pid = os.fork()
        if pid == 0:  # the worker: repack until the fault wrapper kills it
            code = 0
            try:
                storage = FaultStorage(LocalStorage(bank_dir), kill_at=kill_at, torn=torn)
                wb.Bank(storage, workers=2).repack(keyframe=keyframe[0] if keyframe else None)
            except BaseException as e:  # report, do not hide: the parent fails on it
                sys.stderr.write(f"worker kill_at={kill_at}: {type(e).__name__}: {e}\n")
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results.append({"dir": bank_dir, "pid": pid, "signal": os.WTERMSIG(status)})
        else:
            results.append({"dir": bank_dir, "pid": pid, "exit": os.WEXITSTATUS(status)})
    os.write(1, ("result " + json.dumps(results) + "\n").encode())


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    mode, args = sys.argv[1], sys.argv[2:]
    if mode != "sweep":
        sys.exit(f"unknown mode {mode!r}")
    sweep(*args)


if __name__ == "__main__":
    main()
