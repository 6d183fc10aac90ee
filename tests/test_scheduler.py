"""LR schedules (ext/training/scheduler.py): every schedule against its closed form at
every step, torchtitan equivalence, config errors, the lr-schedule CLI, and LR
continuity across checkpoint/resume in a real run.

The expected values here are written independently of ext.training.scheduler: each
schedule is assembled phase by phase as a list (warmup, hold, decay), and the
step-by-step values are read from a real LambdaLR driven like the trainer
drives it (the LR the optimizer holds when it steps)."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import pytest
import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers as torchtitan_build
from torchtitan.config import ConfigManager

import ext.job_config  # noqa: F401
from ext.cli import main as cli_main
from ext.core.errors import ConfigError
from ext.training.scheduler import build_lr_schedulers, resolve_schedule

from .conftest import REPO, read_summary, run_train

WSD_CONFIG = REPO / "train_configs" / "debug_wsd.toml"
LR = 2e-3
BASE = ConfigManager().parse_args(["--job.custom_config_module", "ext.job_config"]).lr_scheduler


def section(**kw):
    """Our merged [lr_scheduler] section with ``kw`` set (warmup 0 unless given)."""
    return dataclasses.replace(BASE, **{"warmup_steps": 0, **kw})


def trained_lrs(build, cfg, steps: int, run_steps: int | None = None) -> list[float]:
    """LR the optimizer uses at steps 1..run_steps, with the scheduler built by ``build``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    container = build([opt], cfg, steps)
    used = []
    for _ in range(run_steps or steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        container.step()
    return used


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-15), (step, got, want)


# ------------------------------------------------- expected, written out by phase

def shape_at(shape: str, p: float, m: float) -> float:
    if shape == "exponential":
        return m**p
    x = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - p**0.5}[shape]
    return m + (1 - m) * x


def ramp(w: int, a: float) -> list[float]:
    """torchtitan-style warmup: step s of w trains at a + (1 - a) s / w."""
    return [a + (1 - a) * s / w for s in range(1, w + 1)]


def tt_style(kind, T, W, *, a=0.0, D=None, shape="linear", m=0.0, tau=None) -> list[float]:
    W = min(W, T)
    out = ramp(W, a)
    if kind == "constant":
        out += [1.0] * (T - W)
    elif kind == "inverse_sqrt":
        tau = tau or W
        out += [m + (1 - m) * (tau / (tau + n)) ** 0.5 for n in range(1, T - W + 1)]
    else:
        D = T - W if D is None else min(D, T - W)
        # the decay ends at the virtual step T + 1: the D - 1 steps before it decay
        hold = T - W - max(D - 1, 0)
        out += [1.0] * hold + [shape_at(shape, k / D, m) for k in range(1, D)]
    return [LR * f for f in out]


def prime_style(kind, T, W, *, a=None, D=None, m=0.0) -> list[float]:
    W = min(W, T)
    a = m if a is None else a
    out = [a + (1 - a) * i / W for i in range(W)]  # i = steps already taken
    rest = T - W
    if kind == "prime_constant":
        out += [1.0] * rest
    elif kind == "prime_cosine":
        out += [m + (1 - m) * (1 + math.cos(math.pi * k / rest)) / 2 for k in range(rest)]
    else:
        D = rest if D is None else min(D, rest)
        decay = [1 - (1 - m) * k / (D - 1) for k in range(D)] if D > 1 else [m] * D
        out += [1.0] * (rest - D) + decay
    return [LR * f for f in out]


# --------------------------------------------------------- every schedule, every step

CASES = [
    # (id, section fields, expected, T)
    ("constant", dict(schedule="constant", warmup_steps=5), tt_style("constant", 20, 5), 20),
    ("constant-start", dict(schedule="constant", warmup_steps=5, warmup_start_factor=0.2),
     tt_style("constant", 20, 5, a=0.2), 20),
    ("linear", dict(schedule="linear", warmup_steps=5), tt_style("linear", 20, 5), 20),
    ("linear-minfactor", dict(schedule="linear", warmup_steps=5, min_lr_factor=0.1),
     tt_style("linear", 20, 5, m=0.1), 20),
    ("linear-minlr", dict(schedule="linear", warmup_steps=5, min_lr=4e-4),
     tt_style("linear", 20, 5, m=0.2), 20),
    ("cosine", dict(schedule="cosine", warmup_steps=4, min_lr_factor=0.2),
     tt_style("cosine", 17, 4, shape="cosine", m=0.2), 17),
    ("cosine-nowarmup", dict(schedule="cosine"), tt_style("cosine", 20, 0, shape="cosine"), 20),
    ("inverse_sqrt", dict(schedule="inverse_sqrt", warmup_steps=4), tt_style("inverse_sqrt", 30, 4), 30),
    ("inverse_sqrt-tau-min", dict(schedule="inverse_sqrt", inverse_sqrt_timescale=10, min_lr_factor=0.1),
     tt_style("inverse_sqrt", 30, 0, tau=10, m=0.1), 30),
    *[
        (f"wsd-{shape}", dict(schedule="wsd", warmup_steps=3, decay_steps=6, decay_shape=shape, min_lr=1e-4),
         tt_style("wsd", 24, 3, D=6, shape=shape, m=0.05), 24)
        for shape in ("linear", "cosine", "1-sqrt", "exponential")
    ],
    ("wsd-ratio", dict(schedule="wsd", warmup_steps=3, decay_ratio=0.25, decay_shape="cosine"),
     tt_style("wsd", 24, 3, D=6, shape="cosine"), 24),
    ("wsd-nowarmup", dict(schedule="wsd", decay_steps=5, warmup_start_factor=0.5),
     tt_style("wsd", 12, 0, D=5), 12),
    ("wsd-decay-longer-than-training", dict(schedule="wsd", warmup_steps=3, decay_steps=100),
     tt_style("wsd", 10, 3, D=7), 10),
    ("wsd-decay-0", dict(schedule="wsd", warmup_steps=3, decay_steps=0), tt_style("constant", 10, 3), 10),
    ("warmup-longer-than-training", dict(schedule="cosine", warmup_steps=30), tt_style("cosine", 10, 30), 10),
    ("total_steps", dict(schedule="linear", warmup_steps=2, total_steps=12), tt_style("linear", 12, 2)[:8], 8),
    ("prime_constant", dict(schedule="prime_constant", warmup_steps=3, min_lr_factor=0.1),
     prime_style("prime_constant", 10, 3, m=0.1), 10),
    ("prime_linear", dict(schedule="prime_linear", warmup_steps=3, decay_steps=4, min_lr_factor=0.1),
     prime_style("prime_linear", 12, 3, D=4, m=0.1), 12),
    ("prime_linear-all", dict(schedule="prime_linear", warmup_steps=3, min_lr=2e-4),
     prime_style("prime_linear", 12, 3, m=0.1), 12),
    ("prime_linear-D1", dict(schedule="prime_linear", warmup_steps=3, decay_steps=1, min_lr_factor=0.1),
     prime_style("prime_linear", 12, 3, D=1, m=0.1), 12),
    ("prime_linear-too-long", dict(schedule="prime_linear", warmup_steps=3, decay_steps=50),
     prime_style("prime_linear", 12, 3, D=9), 12),
    ("prime_cosine", dict(schedule="prime_cosine", warmup_steps=3, min_lr_factor=0.1),
     prime_style("prime_cosine", 12, 3, m=0.1), 12),
    ("prime_cosine-nowarmup-start", dict(schedule="prime_cosine", warmup_start_factor=0.5),
     prime_style("prime_cosine", 12, 0), 12),
]
# one-step runs, with and without warmup, for every schedule
ONE_STEP = {
    "constant": [LR], "linear": [LR], "cosine": [LR], "inverse_sqrt": [LR],
    "wsd": [LR], "prime_constant": [LR], "prime_linear": [0.1 * LR], "prime_cosine": [LR],
}


@pytest.mark.parametrize("fields,want,steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schedule_matches_its_closed_form_at_every_step(fields, want, steps):
    cfg = section(**fields)
    assert_close(trained_lrs(build_lr_schedulers, cfg, steps), want)
    # the pure factor agrees with what LambdaLR gave
    schedule = resolve_schedule(cfg, steps, LR)
    assert_close([schedule.lr(s) for s in range(1, steps + 1)], want)


@pytest.mark.parametrize("name", list(ONE_STEP))
@pytest.mark.parametrize("warmup", [0, 1])
def test_one_step_runs(name, warmup):
    extra = {"decay_steps": 1} if name == "wsd" else {}
    if name == "inverse_sqrt" and warmup == 0:
        extra["inverse_sqrt_timescale"] = 3
    cfg = section(schedule=name, warmup_steps=warmup, min_lr_factor=0.1, **extra)
    got = trained_lrs(build_lr_schedulers, cfg, 1)
    # with one warmup step the only step is the end of warmup: the peak, except
    # that prime-rl's warmup starts at the minimum
    want = [0.1 * LR] if name.startswith("prime") and warmup else ([LR] if warmup else ONE_STEP[name])
    if name == "inverse_sqrt" and warmup == 0:  # already one step past the (virtual) peak at step 0
        want = [LR * (0.1 + 0.9 * (3 / 4) ** 0.5)]
    assert_close(got, want)


def test_inverse_sqrt_default_timescale_is_the_classic_form():
    lrs = trained_lrs(build_lr_schedulers, section(schedule="inverse_sqrt", warmup_steps=8), 40)
    assert_close(lrs[7:], [LR * (8 / s) ** 0.5 for s in range(8, 41)])


def test_past_the_schedule_end_the_lr_holds_its_final_value():
    cfg = section(schedule="linear", warmup_steps=2, total_steps=10, min_lr_factor=0.1)
    lrs = trained_lrs(build_lr_schedulers, cfg, 10, run_steps=15)
    assert_close(lrs[10:], [0.1 * LR] * 5)


# --------------------------------------------------------------- torchtitan's own

TT = [
    (dict(warmup_steps=w, decay_ratio=r, decay_type=t, min_lr_factor=m), T)
    for w, T in ((0, 1), (1, 1), (0, 15), (4, 15), (15, 15), (20, 15))
    for r in (None, 0.4, 0.95)
    for t in ("linear", "cosine", "sqrt")
    for m in (0.0, 0.1)
]
OUR_SHAPE = {"linear": "linear", "cosine": "cosine", "sqrt": "1-sqrt"}


@pytest.mark.parametrize("fields,steps", TT, ids=[f"{f}-T{T}" for f, T in TT])
def test_torchtitan_schedule_is_torchtitans_and_ours_agree_with_it(fields, steps):
    theirs = trained_lrs(torchtitan_build, section(**fields), steps)
    assert_close(trained_lrs(build_lr_schedulers, section(schedule="torchtitan", **fields), steps), theirs)
    # the same schedule in our terms
    w, r, t = fields["warmup_steps"], fields["decay_ratio"], fields["decay_type"]
    common = dict(warmup_steps=w, min_lr_factor=fields["min_lr_factor"])
    if r is not None:
        ours = section(schedule="wsd", decay_ratio=r, decay_shape=OUR_SHAPE[t], **common)
    elif t == "sqrt":
        ours = section(schedule="wsd", decay_steps=max(steps - w, 0), decay_shape="1-sqrt", **common)
    else:
        ours = section(schedule=t, **common)
    assert_close(trained_lrs(build_lr_schedulers, ours, steps), theirs)


def test_torchtitan_schedule_takes_an_absolute_min_lr():
    fields = dict(warmup_steps=3, decay_type="cosine")
    want = trained_lrs(torchtitan_build, section(min_lr_factor=0.25, **fields), 12)
    got = trained_lrs(build_lr_schedulers, section(schedule="torchtitan", min_lr=0.25 * LR, **fields), 12)
    assert_close(got, want)


def test_prime_schedules_match_torch_schedulers_composed_the_prime_rl_way():
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    T, W, D, m = 14, 3, 5, 0.1

    def run(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        sched = make(opt)
        out = []
        for _ in range(T):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    linear = run(lambda o: SequentialLR(o, [
        LinearLR(o, start_factor=m, end_factor=1.0, total_iters=W),
        LinearLR(o, start_factor=1.0, end_factor=1.0, total_iters=T - D - W),
        LinearLR(o, start_factor=1.0, end_factor=m, total_iters=D - 1),
    ], milestones=[W, T - D]))
    cosine = run(lambda o: SequentialLR(o, [
        LinearLR(o, start_factor=m, end_factor=1.0, total_iters=W),
        CosineAnnealingLR(o, T_max=T - W, eta_min=m * LR),
    ], milestones=[W]))
    for want, fields in (
        (linear, dict(schedule="prime_linear", warmup_steps=W, decay_steps=D, min_lr_factor=m)),
        (cosine, dict(schedule="prime_cosine", warmup_steps=W, min_lr_factor=m)),
    ):
        got = trained_lrs(build_lr_schedulers, section(**fields), T)
        for g, w in zip(got, want):
            assert math.isclose(g, w, rel_tol=1e-7), (fields, got, want)


# ------------------------------------------------------------------ config errors

ERRORS = [
    (dict(schedule="cosinus"), r"schedule = 'cosinus' is unknown; use one of torchtitan, constant"),
    (dict(schedule="linear", min_lr=1e-4, min_lr_factor=0.1), r"min_lr = .* and min_lr_factor = .* are both set"),
    (dict(schedule="linear", min_lr=1.0), r"min_lr = 1.0: must be in \[0, optimizer.lr"),
    (dict(schedule="linear", min_lr_factor=1.5), r"min_lr_factor = 1.5: must be in \[0, 1\]"),
    (dict(warmup_start_factor=0.1), r"warmup_start_factor is not read by schedule 'torchtitan'"),
    (dict(schedule="constant", warmup_start_factor=2.0), r"warmup_start_factor = 2.0: must be in \[0, 1\]"),
    (dict(schedule="wsd", decay_steps=3, decay_type="cosine"), r"decay_type = 'cosine' is read by schedule 'torchtitan' only.*decay_shape"),
    (dict(schedule="cosine", decay_steps=3), r"decay_steps is read by schedules wsd and prime_linear only"),
    (dict(decay_steps=3), r"decay_steps .* with schedule 'torchtitan' use decay_ratio"),
    (dict(schedule="constant", decay_ratio=0.2), r"decay_ratio is read by schedules torchtitan, wsd, prime_linear only"),
    (dict(schedule="wsd", decay_steps=3, decay_ratio=0.2), r"decay_steps and decay_ratio are both set"),
    (dict(schedule="wsd"), r"schedule 'wsd' needs a decay length: set decay_steps or decay_ratio"),
    (dict(schedule="wsd", decay_steps=-1), r"decay_steps = -1: must be >= 0"),
    (dict(schedule="wsd", decay_ratio=1.5), r"decay_ratio = 1.5: must be in \[0, 1\]"),
    (dict(schedule="cosine", decay_shape="cosine"), r"decay_shape is read by schedule 'wsd' only"),
    (dict(schedule="wsd", decay_steps=3, decay_shape="sqrt"), r"decay_shape = 'sqrt' is unknown; use one of linear, cosine, 1-sqrt"),
    (dict(schedule="wsd", decay_steps=3, decay_shape="exponential"), r"'exponential' needs a minimum LR > 0"),
    (dict(schedule="cosine", inverse_sqrt_timescale=5), r"inverse_sqrt_timescale is read by schedule 'inverse_sqrt' only"),
    (dict(schedule="inverse_sqrt"), r"warmup_steps = 0 needs inverse_sqrt_timescale >= 1"),
    (dict(schedule="inverse_sqrt", inverse_sqrt_timescale=0), r"inverse_sqrt_timescale = 0: must be >= 1"),
    (dict(schedule="constant", warmup_steps=-2), r"warmup_steps = -2: must be >= 0"),
    (dict(schedule="linear", total_steps=0), r"total_steps = 0: must be >= 1"),
]


@pytest.mark.parametrize("fields,message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_config_errors_name_the_key_and_the_fix_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_schedule(section(**fields), 20, LR)
    text = str(info.value)
    assert text.startswith("[lr_scheduler] ") and "\n" not in text


def test_shipped_wsd_config_parses_and_default_schedule_is_torchtitans():
    cfg = ConfigManager().parse_args(["--job.config_file", str(WSD_CONFIG)])
    s = cfg.lr_scheduler
    assert (s.schedule, s.decay_ratio, s.decay_shape, s.min_lr) == ("wsd", 0.2, "1-sqrt", 3e-4)
    assert s.warmup_steps == 20 and s.min_lr_factor == 0.0  # torchtitan's fields, as before
    assert BASE.schedule == "torchtitan" and BASE.decay_type == "linear"


def test_unknown_lr_scheduler_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\ncustom_config_module = "ext.job_config"\n[lr_scheduler]\nshedule = "wsd"\n')
    with pytest.raises(ValueError, match="shedule"):
        ConfigManager().parse_args(["--job.config_file", str(bad)])


# ---------------------------------------------------------------------------- CLI

def _rows(out: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^\s+(\d+)\s+(\S+)\s+\S+", out, re.M)}


def test_cli_prints_the_schedule_at_its_landmarks(tmp_path, capsys):
    plot = tmp_path / "plots" / "lr.png"
    assert cli_main(["lr-schedule", "--job.config_file", str(WSD_CONFIG), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "LR schedule wsd: warmup 20 steps" in out and "1-sqrt decay over the last 40 steps" in out
    rows = _rows(out)
    assert 15 <= len(rows) <= 22
    # first, warmup end, decay start (first step below the peak), last
    for step, label in ((1, "first"), (20, "warmup end"), (162, "decay start"), (200, "last")):
        assert re.search(rf"^\s+{step}\s+\S+\s+\S+\s+{label}$", out, re.M), out
    want = tt_style("wsd", 200, 20, D=40, shape="1-sqrt", m=0.1)
    for step, lr in rows.items():
        assert math.isclose(lr, want[step - 1] * 3e-3 / LR, rel_tol=1e-4), (step, lr)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out and not plot.exists()
    else:
        assert f"plot: {plot}" in out and plot.stat().st_size > 1000


def test_cli_takes_trainer_overrides_and_prints_every_step_of_short_runs(tmp_path, capsys):
    rc = cli_main([
        "lr-schedule", "--job.config_file", str(WSD_CONFIG), "--plot", "",
        "--training.steps", "6", "--lr_scheduler.schedule", "torchtitan",
        "--lr_scheduler.decay_ratio", "0.5", "--lr_scheduler.warmup_steps", "2",
        "--lr_scheduler.decay_shape", "linear", "--lr_scheduler.min_lr", "0",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("LR schedule torchtitan") and "plot" not in out
    want = trained_lrs(torchtitan_build, section(warmup_steps=2, decay_ratio=0.5), 6)
    got = _rows(out)
    assert list(got) == [1, 2, 3, 4, 5, 6]
    for step, lr in got.items():
        assert math.isclose(lr, want[step - 1] * 3e-3 / LR, rel_tol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--lr_scheduler.schedule", "bogus"], "error: [lr_scheduler] schedule = 'bogus' is unknown"),
    (["--lr_scheduler.min_lr_factor", "0.1"], "error: [lr_scheduler] min_lr = 0.0003 and min_lr_factor = 0.1 are both set"),
])
def test_cli_config_error_is_one_line_and_exit_2(capsys, args, message):
    assert cli_main(["lr-schedule", "--job.config_file", str(WSD_CONFIG), "--plot", "", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message), err


def test_cli_missing_config_file(capsys, tmp_path):
    assert cli_main(["lr-schedule", "--job.config_file", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------- real runs: logging and resume

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _console_lrs(output: str) -> dict[int, float]:
    text = ANSI.sub("", output)
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step:\s+(\d+)\s+lr: (\S+)", text)}


def _tensorboard_lrs(dump) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (dump / "tb").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("lr")}


@pytest.mark.slow
def test_lr_is_logged_every_step_and_continues_across_checkpoint_resume(tmp_path):
    # wsd over 8 steps: warmup 2, peak at 3, decay 4..8 across the checkpoint at 4
    common = [
        "--job.config_file", str(WSD_CONFIG), "--training.steps", "8",
        "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0.75",
        "--checkpoint.enable", "--checkpoint.interval", "4", "--data.num_workers", "0",
    ]
    want = tt_style("wsd", 8, 2, D=6, shape="1-sqrt", m=0.1)
    want = [x * 3e-3 / LR for x in want]

    whole = tmp_path / "whole"
    proc = run_train([*common, "--job.dump_folder", str(whole), "--metrics.log_freq", "3",
                      "--metrics.enable_tensorboard", "--lr_scheduler.log_every_step"])
    console = _console_lrs(proc.output)
    board = _tensorboard_lrs(whole)
    assert sorted(console) == sorted(board) == list(range(1, 9))  # every step, not only log steps
    for step in range(1, 9):
        assert math.isclose(board[step], want[step - 1], rel_tol=1e-6), (step, board, want)
        assert math.isclose(console[step], want[step - 1], rel_tol=1e-4), (step, console, want)
    assert [h["step"] for h in read_summary(whole)["history"]] == [1, 3, 6, 8]  # and the last step

    # resume from the step-4 checkpoint of the same run and train steps 5..8 again,
    # this time with the LR on the console at log steps only
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint" / "step-4", resumed / "checkpoint" / "step-4")
    proc = run_train([*common, "--job.dump_folder", str(resumed), "--metrics.log_freq", "2",
                      "--metrics.enable_tensorboard", "--lr_scheduler.no-log_every_step"])
    assert "Training starts at step 5" in proc.output
    assert sorted(_console_lrs(proc.output)) == [6, 8]
    again = _tensorboard_lrs(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step, lr in again.items():
        assert lr == board[step], (step, again, board)
    history = read_summary(resumed)["history"]
    assert [h["step"] for h in history] == [6, 8]
    for h in history:
        assert math.isclose(h["lr"], want[h["step"] - 1], rel_tol=1e-12), (h, want)
