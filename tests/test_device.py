"""The CPU support module patches torchtitan only when no accelerator is present."""

from __future__ import annotations

import pytest
import torchtitan.components.metrics as tt_metrics
import torchtitan.distributed.parallel_dims as tt_parallel_dims
import torchtitan.tools.utils as tt_utils

import ext.job_config  # noqa: F401  (installs CPU support on CPU-only hosts)
from ext.core.device import CpuDeviceModule, accelerator_present, install_cpu_support

cpu_only = pytest.mark.skipif(accelerator_present(), reason="checks the CPU-only path")


@cpu_only
def test_every_copied_device_global_points_at_the_cpu():
    assert install_cpu_support() is True  # idempotent: second call reports the same
    assert tt_utils.device_type == tt_parallel_dims.device_type == tt_metrics.device_type == "cpu"
    assert isinstance(tt_metrics.device_module, CpuDeviceModule)


@cpu_only
def test_cpu_memory_monitor_reports_process_memory():
    monitor = tt_metrics.build_device_memory_monitor()
    stats = monitor.get_peak_stats()
    assert 0 < stats.max_reserved_gib < monitor.device_capacity_gib
    assert stats.num_ooms == 0


@pytest.mark.skipif(not accelerator_present(), reason="needs an accelerator")
def test_nothing_is_patched_with_an_accelerator():
    assert install_cpu_support() is False
    assert tt_utils.device_type != "cpu"
