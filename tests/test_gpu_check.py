"""benchmarks/gpu_check.py: the prepared GPU check cannot rot while no GPU is at hand.

The dry run executes the same code as the GPU run on the CPU (tiny flavors,
short rows, few steps); these tests read its JSON. No timing is asserted.
"""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import run_command

PARTS = ("kernels", "training", "moe", "loss_check")


def assert_reported(value, where: str) -> None:
    """Every leaf is a figure or an explicit reason; nothing failed."""
    if isinstance(value, dict):
        assert "error" not in value, f"{where}: {value['error']}"
        assert value, f"{where}: empty"
        for key, item in value.items():
            assert_reported(item, f"{where}.{key}")
    elif isinstance(value, str):
        assert not value.startswith("error"), f"{where}: {value}"


@pytest.mark.slow
def test_dry_run_reports_every_part_with_figures_or_a_reason(tmp_path):
    out = tmp_path / "result.json"
    # a generous budget: on a loaded CI machine the parts must still run, not be skipped
    proc = run_command([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--deadline-s", "900",
                        "--out", str(out)], timeout=900)
    assert proc.returncode == 0, proc.output[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["dry_run"] is True
    assert result["device"]["name"] == "cpu" and result["device"]["torch"]
    assert result["elapsed_s"] > 0
    for part in PARTS:
        assert part in result, f"{part} missing"
        assert "status" not in result[part], f"{part}: {result[part]['status']}"
        assert_reported(result[part], part)

    # kernels: every CPU-computable difference is small; what needs CUDA says so
    kernels = result["kernels"]
    assert set(kernels["cases"]) == {"documents", "skyladder_w32"}
    for case, entry in kernels["cases"].items():
        assert min(entry["segments_per_row"]) > 1, case  # several documents per row
        varlen = entry["fp32"]["varlen"]  # the emulation built from dense SDPA
        assert varlen["kernel"].startswith("skipped: needs CUDA")
        for key in ("out", "dq", "dk", "dv"):
            assert varlen[key] < 1e-5, (case, key, varlen[key])
        flex = entry["fp32"]["flex"]  # eager flex forward; no CPU backward
        assert flex["out"] < 1e-5, (case, flex)
        assert flex["backward"].startswith("skipped: needs CUDA")
        for backend in ("flex", "varlen"):
            assert entry["bf16"][backend]["out"] < 0.1, (case, backend, entry["bf16"][backend])

    # training: real trainer launches; flex/varlen need CUDA, the dense stand-in runs
    runs = result["training"]["runs"]
    assert runs["flex_docmask"].startswith("skipped: needs CUDA")
    assert runs["varlen_docmask"].startswith("skipped: needs CUDA")
    for name in ("causal", "dense_docmask"):
        run = runs[name]
        assert isinstance(run, dict), (name, run)
        assert run["tokens_per_s"] > 0 and run["timed_steps"] == 4, (name, run)
        assert run["mfu_palm_pct"] is None and run["peak_tflops"] is None  # the CPU has no peak
    for name in ("dense_skyladder_w32", "causal_prefetch_off"):  # options parsed, no launch
        assert runs[name].startswith("skipped: dry run: options parsed"), (name, runs[name])
    ratios = result["training"]["ratios"]
    assert isinstance(ratios["dense_docmask_over_causal"], float)
    assert ratios["flex_docmask_over_causal"].startswith("n/a")

    # MoE: fp32 on the CPU, grouped and loop experts agree
    moe = result["moe"]
    assert moe["grouped_step_s"] > 0 and moe["loop_step_s"] > 0
    assert moe["logits_max_abs_diff"] < 1e-4 and moe["grad_max_abs_diff"] < 1e-4, moe

    # loss check: the loss falls
    loss = result["loss_check"]
    assert loss["falls"] and loss["last_loss"] < loss["first_loss"] - 0.5, loss


def test_without_a_gpu_the_full_check_refuses_in_one_line():
    proc = run_command([sys.executable, "benchmarks/gpu_check.py"], timeout=120)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device: run on a GPU, or use --dry-run for the CPU rehearsal"
    ]
