"""The trainer's console: colour only on a terminal, known-harmless noise left out.

:func:`quiet_known_noise` (called by :func:`ext.train.run` before torchtitan
starts) filters, on every run:

- Python warnings that are harmless here: torchdata's ``set_vital`` deprecation
  (from inside ``StatefulDataLoader``) and torch's "In CPU autocast, but the
  target dtype is not supported" (a CPU run trains in float32; the memory
  estimate of the preflight counts that), and DTensor's "random operators /
  manual_seed() may not have complete support on cpu device mesh" (multi-process
  CPU runs: the FSDP runs of the tests train and resume on it);
- torchtitan log lines: ``model.safetensors.index.json not found`` (a model
  without an index is saved as one file, which is what it says it will do),
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING ... overridden`` on a host without CUDA
  (no NCCL), ``Peak FLOPS used for computing MFU: nan`` (our ``flops:`` line
  says the peak is unknown and shows ``mfu n/a``), the ``mfu: nan%`` column
  of the step line, and ``Warmup steps (N) exceed total steps`` (the ``LR
  schedule`` line says the warmup used); the ``(warmup N)`` of the trainer's
  start line is the warmup used, not the one asked.

:func:`use_color`: colour codes only when the output is a terminal. Under
torchrun the ranks' output goes through pipes, so the launcher
(:mod:`ext.launch`) records whether *its* output is a terminal in
``EXT_COLOR`` for them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

COLOR_ENV = "EXT_COLOR"

_DROP = (
    re.compile(r"model\.safetensors\.index\.json not found"),
    re.compile(r"Peak FLOPS used for computing MFU: nan"),
    re.compile(r"Warmup steps \(\d+\) exceed total steps"),
)
_NCCL_ENV = re.compile(r"ENV\[TORCH_NCCL_ASYNC_ERROR_HANDLING\]")
_MFU_NAN = re.compile(r"\s*(\x1b\[[0-9;]*m)?mfu: nan%")
_WARMUP = re.compile(r"total steps (\d+) \(warmup (\d+)\)")


def use_color() -> bool:
    """Colour codes in console lines: ``EXT_COLOR`` (1/0) when set, else whether stdout is a terminal."""
    value = os.environ.get(COLOR_ENV)
    if value is not None:
        return value.strip() == "1"
    return sys.stdout.isatty()


class _KnownNoise(logging.Filter):
    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda = cuda

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(p.search(msg) for p in _DROP) or (not self.cuda and _NCCL_ENV.search(msg)):
            return False
        changed = _MFU_NAN.sub("", msg)
        warmup = _WARMUP.search(changed)
        if warmup and int(warmup.group(2)) > int(warmup.group(1)):  # torchtitan clamps it to the steps
            changed = changed.replace(warmup.group(0), f"total steps {warmup.group(1)} (warmup {warmup.group(1)})")
        if changed != msg:
            record.msg, record.args = changed, None
        return True


_installed: _KnownNoise | None = None


def quiet_known_noise() -> None:
    """Install the filters above (once per process)."""
    global _installed
    warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=r"In CPU autocast, but the target dtype is not supported")
    warnings.filterwarnings("ignore", message=r"DTensor .* may not have complete support on cpu device mesh")
    if _installed is None:
        import torch

        _installed = _KnownNoise(torch.cuda.is_available())
        logging.getLogger().addFilter(_installed)  # torchtitan logs through the root logger
