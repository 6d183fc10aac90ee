"""``python -m ext.launch``: torchrun with a shorter failure report.

Takes torchrun's arguments and runs torchrun's own launcher. When a rank
fails, torchrun prints its failure summary (the root-cause rank, its exit
code and error) followed by the launcher's own Python traceback, and exits
with 1 whatever the rank's code was. Here only the summary is printed and
the exit code is the first failed rank's: 2 for the one-line configuration
and data errors of :mod:`ext.train`, 128 + N for a rank killed by signal N.
When torchrun itself gets a termination signal (SIGTERM, SIGINT, SIGHUP,
SIGQUIT and SIGUSR1) it passes it on to the ranks (which save and stop,
``[preemption]``) and waits for them; the exit code is then 128 + that
signal's number, without torchrun's traceback, when every local rank
reported its stop finished, and :data:`STOP_NOT_SAVED` (3) with one line
when some were killed first (the stop checkpoint is not committed).
``run_train.sh`` launches through this module.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code(failure_exitcode: int) -> int:
    """Shell exit code for a rank's exit code (negative: killed by that signal)."""
    if failure_exitcode < 0:
        return 128 - failure_exitcode
    return failure_exitcode if 0 < failure_exitcode < 256 else 1


# torchrun forwards only the signals in its --signals-to-handle option (env
# PET_SIGNALS_TO_HANDLE; torchrun's default leaves out SIGUSR1, which then
# kills the launcher and leaves the ranks running unsupervised). SIGUSR1 is
# what `sbatch --signal=USR1@120` sends before a time limit; the ranks stop
# on it like on SIGTERM ([preemption]). An explicit option or env value wins.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


STOP_REPORT_ENV = "EXT_STOP_REPORT_DIR"
"""Folder (set here, inherited by the ranks) where each local rank reports a
finished stop (:func:`ext.train.run`)."""
STOP_NOT_SAVED = 3
"""Exit code when a stop signal ended the run before every local rank had
finished its stop (saved and committed the step reached): typically the save
outlasted ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` and the ranks were killed."""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", SIGNALS_TO_HANDLE)
    # the ranks write into pipes: tell them whether the console is a terminal (ext.core.logs.use_color)
    os.environ.setdefault("EXT_COLOR", "1" if sys.stdout.isatty() else "0")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="ext-stop-") as reports:
        os.environ[STOP_REPORT_ENV] = reports  # the ranks inherit it
        try:
            run(args)
        except ChildFailedError as exc:
            print(exc.format_msg(), file=sys.stderr, flush=True)
            return exit_code(exc.get_first_failure()[1].exitcode)
        except SignalException as exc:  # torchrun passed it on to the ranks and waited for them
            return stopped(exc.sigval, reports, local_ranks(args))
    return 0


def local_ranks(args: Any) -> int:
    """Processes this launcher starts (torchrun's ``--nproc-per-node``)."""
    try:
        return int(args.nproc_per_node)
    except ValueError:  # "gpu", "auto", ...: count what reported against what torchrun saw
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def stopped(sig: signal.Signals, reports: str, n_local: int) -> int:
    """Exit code and one line for a run stopped by ``sig``: 128 + sig when every
    local rank reported its stop finished, else :data:`STOP_NOT_SAVED`."""
    done = len([f for f in os.listdir(reports) if f.startswith("rank-")])
    if done >= n_local:
        print(f"ext.launch: stopped by {sig.name}", file=sys.stderr, flush=True)
        return 128 + int(sig)
    timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
    print(f"ext.launch: stopped by {sig.name}, but {n_local - done} of {n_local} local rank(s) were killed "
          f"before finishing their stop (TORCH_ELASTIC_SHUTDOWN_TIMEOUT = {timeout} s): the step reached "
          "was NOT saved; the run resumes from its previous complete checkpoint (raise the timeout "
          "when a save takes longer)", file=sys.stderr, flush=True)
    return STOP_NOT_SAVED


if __name__ == "__main__":
    sys.exit(main())
