"""Learning-rate schedules: the ``[lr_scheduler]`` section and the train spec's
``build_lr_schedulers_fn``.

Every schedule is a multiplicative factor of ``[optimizer] lr`` (the peak LR)
as a pure function of the training step, ``factor(step)``. Steps are counted
as torchtitan logs them: step 1 is the first optimizer step. torchtitan drives
a ``LambdaLR`` whose lambda receives the number of steps already taken, so
step ``s`` trains with ``lr * factor(s)`` and the lambda is
``lambda i: factor(i + 1)``. The container is torchtitan's own
``LRSchedulersContainer``, so checkpoints hold the same state as before (the
lambda is a plain function and is not saved; a resumed run recomputes the LR
from the restored step count).

Two conventions, both named by the schedule:

* torchtitan's (``torchtitan``, ``constant``, ``linear``, ``cosine``,
  ``inverse_sqrt``, ``wsd``): with ``W`` warmup steps and ``T`` total steps,
  step ``s <= W`` trains at ``a + (1 - a) * s / W`` (``a`` =
  ``warmup_start_factor``, 0 by default, so step 1 never trains at LR 0).
  A decay of ``D`` steps follows the last step at the peak, ``T + 1 - D``,
  with progress ``p = (s - (T + 1 - D)) / D``; it reaches the minimum at the
  virtual step ``T + 1``, so the last step trains one decay increment above
  the minimum. The factor is ``m + (1 - m) * shape(p)`` for minimum factor
  ``m``; exponential decay is ``m ** p``. ``linear`` and ``cosine`` decay over
  all steps after warmup (``D = T - W``) and match torchtitan's own schedule
  with ``decay_ratio`` unset step for step; ``wsd`` matches it with
  ``decay_ratio`` set.
* prime-rl's (``prime_constant``, ``prime_linear``, ``prime_cosine``): with
  ``i = s - 1`` steps taken, warmup is ``a + (1 - a) * i / W`` starting from
  the minimum LR (``a`` = minimum factor unless ``warmup_start_factor`` is
  set; with no minimum the first step trains at LR 0), so the peak is first
  used at step ``W + 1``. ``prime_linear`` holds the peak, then decays
  linearly over its last ``D`` steps to reach the minimum exactly at step
  ``T``; ``prime_cosine`` is a half cosine from step ``W + 1`` to (not
  reaching) the minimum at step ``T + 1``.

Past the schedule's end (``training.steps`` > ``total_steps``) every schedule
but ``torchtitan`` holds its value at ``T + 1``.

Do not add ``from __future__ import annotations`` here: torchtitan's config
merge reads the field types of :class:`LRScheduler` at runtime.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torchtitan.components.lr_scheduler import (
    LRSchedulersContainer,
    build_lr_schedulers as build_torchtitan_lr_schedulers,
)
from torchtitan.tools.logging import logger

from ext.core.errors import ConfigError

OURS = ("constant", "linear", "cosine", "inverse_sqrt", "wsd")
PRIME = ("prime_constant", "prime_linear", "prime_cosine")
SCHEDULES = ("torchtitan", *OURS, *PRIME)
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")
# schedules that read a decay length (decay_steps or decay_ratio)
_DECAY_LENGTH = ("wsd", "prime_linear")


@dataclass
class LRScheduler:
    """Extends torchtitan's ``[lr_scheduler]``; its own fields keep their meaning
    (``warmup_steps`` and ``total_steps`` apply to every schedule)."""

    schedule: str = "torchtitan"
    """
    "torchtitan": torchtitan's own warmup-stable-decay, driven by its fields
    warmup_steps, decay_ratio, decay_type and min_lr_factor exactly as without
    this package. After a linear warmup: "constant", "linear" (decay to the
    minimum), "cosine", "inverse_sqrt", or "wsd" (hold the peak, then decay
    for decay_steps or decay_ratio of the steps, shaped by decay_shape).
    prime-rl style (warmup from the minimum LR): "prime_constant",
    "prime_linear" (hold, then linear decay over decay_steps, default all steps
    after warmup, reaching the minimum at the last step), "prime_cosine".
    Preview any schedule with `python -m ext.cli lr-schedule --job.config_file X`.
    """

    warmup_start_factor: float | None = None
    """
    Where the linear warmup starts, as a fraction of optimizer.lr (in [0, 1]).
    Default: 0 for torchtitan-style schedules (the ramp starts at 0 before step
    1, so step 1 trains at lr / warmup_steps), the minimum LR factor for the
    prime_* schedules (step 1 trains at the minimum). Not read by "torchtitan".
    """

    min_lr: float | None = None
    """
    Minimum LR as an absolute value, the end point of the decay. Exclusive with
    torchtitan's min_lr_factor (a fraction of optimizer.lr): set one of them;
    min_lr_factor must stay 0 when min_lr is set. Works with every schedule
    ("torchtitan" gets min_lr_factor = min_lr / optimizer.lr).
    """

    decay_steps: int | None = None
    """
    Length of the decay in steps, for "wsd" and "prime_linear" (which decay
    during their last decay_steps steps). Alternative: torchtitan's
    decay_ratio, the decay length as a fraction of the total steps; set one.
    A decay longer than the steps after warmup is shortened to them, with a
    warning, as torchtitan does. "wsd" needs one of the two; "prime_linear"
    defaults to all steps after warmup.
    """

    decay_shape: str = "linear"
    """
    Shape of the "wsd" decay from the peak to the minimum: "linear", "cosine"
    (half cosine), "1-sqrt" (1 - sqrt(progress), torchtitan's "sqrt"), or
    "exponential" (geometric, lr * min_factor ** progress; needs a minimum LR
    above 0).
    """

    inverse_sqrt_timescale: int | None = None
    """
    For "inverse_sqrt": after warmup, factor = sqrt(timescale / (timescale +
    steps since warmup)), scaled into [minimum, 1]. Default: warmup_steps,
    which gives the classic sqrt(warmup_steps / step).
    """

    log_every_step: bool = False
    """
    true: print a compact `step: N  lr: X` console line at every step. false
    (default): only at metrics.log_freq steps. TensorBoard gets the LR at
    every step either way.
    """


_DEFAULTS = LRScheduler()


def _field(cfg: Any, name: str) -> Any:
    """Our field from a merged config, or its default when ``cfg`` is torchtitan's
    section alone (our train spec used without ``ext.job_config``)."""
    return getattr(cfg, name, getattr(_DEFAULTS, name))


# ---------------------------------------------------------------- closed forms


def decay_value(shape: str, progress: float, min_factor: float) -> float:
    """Factor at ``progress`` in [0, 1] of a decay from 1 to ``min_factor``."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "exponential":
        return min_factor**p
    if shape == "linear":
        x = 1.0 - p
    elif shape == "cosine":
        x = 0.5 * (1.0 + math.cos(math.pi * p))
    elif shape == "1-sqrt":
        x = 1.0 - math.sqrt(p)
    else:
        raise ValueError(f"unknown decay shape {shape!r}")
    return min_factor + (1.0 - min_factor) * x


def torchtitan_style_factor(
    step: int,
    *,
    kind: str,
    total: int,
    warmup: int,
    start: float,
    decay: int,
    shape: str,
    min_factor: float,
    timescale: int,
) -> float:
    """``constant``/``linear``/``cosine``/``inverse_sqrt``/``wsd`` at 1-based ``step``.

    ``decay`` is the decay length for ``linear``/``cosine``/``wsd`` (ignored by
    the others); ``timescale`` is read by ``inverse_sqrt`` only.
    """
    if step <= warmup:
        return start + (1.0 - start) * step / warmup
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        x = math.sqrt(timescale / (timescale + step - warmup))
        return min_factor + (1.0 - min_factor) * x
    if decay <= 0:
        return 1.0
    return decay_value(shape, (step - (total + 1 - decay)) / decay, min_factor)


def prime_style_factor(
    step: int,
    *,
    kind: str,
    total: int,
    warmup: int,
    start: float,
    decay: int,
    min_factor: float,
) -> float:
    """``prime_constant``/``prime_linear``/``prime_cosine`` at 1-based ``step``."""
    taken = step - 1
    if taken < warmup:
        return start + (1.0 - start) * taken / warmup
    if kind == "prime_constant":
        return 1.0
    if kind == "prime_cosine":
        span = total - warmup
        if span <= 0:
            return 1.0
        k = min(taken - warmup, span)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * k / span))
    # prime_linear
    first = total - decay  # steps taken when the decay starts (still at the peak)
    if decay <= 0 or taken < first:
        return 1.0
    progress = min((taken - first) / (decay - 1), 1.0) if decay > 1 else 1.0
    return min_factor + (1.0 - min_factor) * (1.0 - progress)


# ------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: ``factor(step)`` times ``peak_lr`` for 1-based steps."""

    name: str
    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_factor: float
    description: str
    factor: Callable[[int], float]
    lr_lambda: Callable[[int], float]
    """What LambdaLR calls with the number of steps taken: ``factor(i + 1)``."""

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)


def _err(message: str) -> ConfigError:
    return ConfigError(f"[lr_scheduler] {message}")


def _min_factor(cfg: Any, peak_lr: float) -> float:
    min_lr = _field(cfg, "min_lr")
    factor = cfg.min_lr_factor
    if not 0.0 <= factor <= 1.0:
        raise _err(f"min_lr_factor = {factor!r}: must be in [0, 1] (a fraction of optimizer.lr)")
    if min_lr is None:
        return float(factor)
    if factor != 0.0:
        raise _err(
            f"min_lr = {min_lr!r} and min_lr_factor = {factor!r} are both set; keep one "
            "(min_lr is an absolute LR, min_lr_factor a fraction of optimizer.lr)"
        )
    if peak_lr <= 0:
        raise _err(f"min_lr = {min_lr!r} needs optimizer.lr > 0 (it is {peak_lr!r}); use min_lr_factor")
    if not 0.0 <= min_lr <= peak_lr:
        raise _err(f"min_lr = {min_lr!r}: must be in [0, optimizer.lr = {peak_lr!r}]")
    return min_lr / peak_lr


def _check_fields(cfg: Any, name: str) -> None:
    """Every field a schedule does not read must keep its default."""
    if name not in SCHEDULES:
        raise _err(f"schedule = {name!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if cfg.warmup_steps < 0:
        raise _err(f"warmup_steps = {cfg.warmup_steps}: must be >= 0")
    start = _field(cfg, "warmup_start_factor")
    if start is not None:
        if name == "torchtitan":
            raise _err(
                "warmup_start_factor is not read by schedule 'torchtitan' (its warmup starts "
                "at 0); remove it or pick another schedule, e.g. 'wsd'"
            )
        if not 0.0 <= start <= 1.0:
            raise _err(f"warmup_start_factor = {start!r}: must be in [0, 1]")
    if name != "torchtitan" and cfg.decay_type != "linear":
        fix = "set decay_shape instead" if name == "wsd" else "remove it"
        raise _err(
            f"decay_type = {cfg.decay_type!r} is read by schedule 'torchtitan' only; "
            f"with schedule {name!r} {fix}"
        )
    decay_steps = _field(cfg, "decay_steps")
    if decay_steps is not None:
        if name not in _DECAY_LENGTH:
            hint = "use decay_ratio" if name == "torchtitan" else "remove it"
            raise _err(
                f"decay_steps is read by schedules {' and '.join(_DECAY_LENGTH)} only; "
                f"with schedule {name!r} {hint}"
            )
        if decay_steps < 0:
            raise _err(f"decay_steps = {decay_steps}: must be >= 0")
    if cfg.decay_ratio is not None:
        if name not in ("torchtitan", *_DECAY_LENGTH):
            raise _err(
                f"decay_ratio is read by schedules torchtitan, {', '.join(_DECAY_LENGTH)} only; "
                f"with schedule {name!r} remove it"
            )
        if decay_steps is not None:
            raise _err("decay_steps and decay_ratio are both set; keep one (steps, or a fraction of the steps)")
        if not 0.0 <= cfg.decay_ratio <= 1.0:
            raise _err(f"decay_ratio = {cfg.decay_ratio!r}: must be in [0, 1]")
    if name == "wsd" and decay_steps is None and cfg.decay_ratio is None:
        raise _err("schedule 'wsd' needs a decay length: set decay_steps or decay_ratio")
    shape = _field(cfg, "decay_shape")
    if shape not in DECAY_SHAPES:
        raise _err(f"decay_shape = {shape!r} is unknown; use one of {', '.join(DECAY_SHAPES)}")
    if shape != _DEFAULTS.decay_shape and name != "wsd":
        raise _err(
            f"decay_shape is read by schedule 'wsd' only; with schedule {name!r} remove it "
            "(the schedule's name fixes its shape)"
        )
    timescale = _field(cfg, "inverse_sqrt_timescale")
    if timescale is not None:
        if name != "inverse_sqrt":
            raise _err("inverse_sqrt_timescale is read by schedule 'inverse_sqrt' only; remove it")
        if timescale < 1:
            raise _err(f"inverse_sqrt_timescale = {timescale}: must be >= 1")
    elif name == "inverse_sqrt" and cfg.warmup_steps == 0:
        raise _err("schedule 'inverse_sqrt' with warmup_steps = 0 needs inverse_sqrt_timescale >= 1")


def _torchtitan_lambda(cfg: Any, min_factor: float, training_steps: int) -> Callable[[int], float]:
    """torchtitan's own lambda, built by its ``build_lr_schedulers`` on a throwaway
    optimizer (so ours is exactly the function torchtitan would use)."""
    plain = dataclasses.replace(cfg, min_lr_factor=min_factor) if dataclasses.is_dataclass(cfg) else cfg
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    container = build_torchtitan_lr_schedulers([dummy], plain, training_steps)  # type: ignore[arg-type]
    return container.schedulers[0].lr_lambdas[0]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def resolve_schedule(cfg: Any, training_steps: int, peak_lr: float) -> Schedule:
    """Check ``cfg`` (the ``[lr_scheduler]`` section) and return its schedule.

    Raises :class:`ConfigError` with a one-line message naming the key and fix.
    """
    name = _field(cfg, "schedule")
    _check_fields(cfg, name)
    total = cfg.total_steps if cfg.total_steps is not None else training_steps
    if total < 1:
        key = "total_steps" if cfg.total_steps is not None else "training.steps"
        raise _err(f"schedule length {key} = {total}: must be >= 1")
    m = _min_factor(cfg, peak_lr)
    lo = f"{_fmt(m)} x lr" if _field(cfg, "min_lr") is None else _fmt(m * peak_lr)

    if name == "torchtitan":
        fn = _torchtitan_lambda(cfg, m, training_steps)
        ratio = "" if cfg.decay_ratio is None else f", decay_ratio {cfg.decay_ratio}"
        warmup = min(cfg.warmup_steps, training_steps)  # torchtitan clamps it to the steps
        asked = f" (warmup_steps {cfg.warmup_steps} > {training_steps} steps)" if warmup < cfg.warmup_steps else ""
        return Schedule(
            name, peak_lr, total, min(cfg.warmup_steps, total), m,
            f"torchtitan: warmup {warmup}{asked}{ratio}, {cfg.decay_type} decay to {lo}",
            factor=lambda step: fn(step - 1), lr_lambda=fn,
        )

    warmup = cfg.warmup_steps
    if warmup > total:
        logger.warning(f"[lr_scheduler] warmup_steps {warmup} > {total} total steps; using {total}")
        warmup = total
    start = _field(cfg, "warmup_start_factor")
    if start is None:
        start = m if name in PRIME else 0.0
    shape = _field(cfg, "decay_shape")
    if name == "wsd" and shape == "exponential" and m <= 0:
        raise _err("decay_shape 'exponential' needs a minimum LR > 0: set min_lr or min_lr_factor")

    decay = total - warmup
    if name in _DECAY_LENGTH:
        steps = _field(cfg, "decay_steps")
        if steps is None and cfg.decay_ratio is not None:
            steps = round(total * cfg.decay_ratio)
        if steps is not None:
            if steps > total - warmup:
                logger.warning(
                    f"[lr_scheduler] decay of {steps} steps does not fit after {warmup} warmup "
                    f"steps of {total}; decaying over the last {total - warmup}"
                )
            decay = min(steps, total - warmup)
    warm = f"warmup {warmup} steps from {_fmt(start)} x lr" if warmup else "no warmup"

    if name in PRIME:
        fn = functools.partial(
            prime_style_factor, kind=name, total=total, warmup=warmup, start=start,
            decay=decay, min_factor=m,
        )
        tail = {
            "prime_constant": "constant",
            "prime_linear": f"linear decay over the last {decay} steps to {lo}",
            "prime_cosine": f"cosine decay to {lo}",
        }[name]
    else:
        timescale = _field(cfg, "inverse_sqrt_timescale") or warmup
        fn = functools.partial(
            torchtitan_style_factor, kind=name, total=total, warmup=warmup, start=start,
            decay=decay, shape={"cosine": "cosine", "wsd": shape}.get(name, "linear"),
            min_factor=m, timescale=timescale,
        )
        tail = {
            "constant": "constant",
            "linear": f"linear decay to {lo}",
            "cosine": f"cosine decay to {lo}",
            "inverse_sqrt": f"inverse sqrt decay (timescale {timescale}) towards {lo}",
            "wsd": f"stable, then {shape} decay over the last {decay} steps to {lo}",
        }[name]
    return Schedule(
        name, peak_lr, total, warmup, m, f"{name}: {warm}, {tail}",
        factor=fn, lr_lambda=lambda taken: fn(taken + 1),
    )


def _peak_lr(optimizers: Any) -> float:
    group = next(iter(optimizers)).param_groups[0]
    return float(group.get("initial_lr", group["lr"]))


def build_lr_schedulers(
    optimizers: Any, lr_scheduler_config: Any, training_steps: int
) -> LRSchedulersContainer:
    """Train-spec ``build_lr_schedulers_fn``: torchtitan's container over our factor."""
    schedule = resolve_schedule(lr_scheduler_config, training_steps, _peak_lr(optimizers))
    logger.info(f"LR schedule {schedule.description}")
    return LRSchedulersContainer(optimizers, schedule.lr_lambda)
