"""The signals that stop a run with a checkpoint.

SIGTERM (what schedulers and torchrun send) and SIGUSR1 (what SLURM's
``--signal`` sends ahead of the time limit). The trainer's handler
(:class:`ext.training.checkpoint.SignalStop`) saves the step in progress and
stops; loader workers ignore both so that only their trainer decides.
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
