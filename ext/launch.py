"""``python -m ext.launch``: torchrun with a shorter failure report.

Takes torchrun's arguments and runs torchrun's own launcher. When a rank
fails, torchrun prints its failure summary (the root-cause rank, its exit
code and error) followed by the launcher's own Python traceback, and exits
with 1 whatever the rank's code was. Here only the summary is printed and
the exit code is the first failed rank's: 2 for the one-line configuration
and data errors of :mod:`ext.train`, 128 + N for a rank killed by signal N.
When torchrun itself gets a termination signal it passes it on to the ranks
(which save and stop, ``[preemption]``) and waits for them; the exit code is
then 128 + that signal's number, without torchrun's traceback.
``run_train.sh`` launches through this module.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code(failure_exitcode: int) -> int:
    """Shell exit code for a rank's exit code (negative: killed by that signal)."""
    if failure_exitcode < 0:
        return 128 - failure_exitcode
    return failure_exitcode if 0 < failure_exitcode < 256 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr, flush=True)
        return exit_code(exc.get_first_failure()[1].exitcode)
    except SignalException as exc:  # torchrun passed it on to the ranks and waited for them
        print(f"ext.launch: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
