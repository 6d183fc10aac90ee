"""Held-out parts of the ``[data]`` sources, for ``[eval]``.

Each training source gets at most one held-out part (``[eval]``, see
:mod:`ext.training.eval`):

- a separate location (``[eval] datasets[i]``: a file, folder or Hub id) or a
  named split of the same Hub dataset (``[eval] splits[i]``); training reads
  its source unchanged;
- or a hash holdout (``[eval] holdout_fraction[i]`` = f > 0): a record belongs
  to it when a hash of its content falls below f. Training skips those records
  and evaluation reads only them, so no held-out document ever reaches a
  training batch.

The hash is BLAKE2b-64 of the record's field value (the text; a conversation
as JSON with sorted keys), read as a fraction of 2**64. It depends on nothing
but the content: the same records are held out whatever the file layout
(resharding, renaming, moving or reordering files), the number of ranks and
workers, the seed or the epoch, and exact duplicates always land on the same
side. Deciding needs the record's text, so the check runs when a record is
read (:class:`ext.data.sources.Source`), not when records are assigned to
readers; training pays one hash per record read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from ext.data.config import Data, SourceSpec, per_source, resolve_sources
from ext.core.errors import ConfigError

_SCALE = float(2**64)


def holdout_hash(value: Any) -> float:
    """The record's position in [0, 1): BLAKE2b-64 of its content / 2**64."""
    if isinstance(value, str):
        data = value.encode("utf-8", errors="surrogatepass")
    else:
        data = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / _SCALE


def in_holdout(value: Any, fraction: float) -> bool:
    """Whether a record with field value ``value`` is in a holdout of ``fraction``."""
    return fraction > 0 and holdout_hash(value) < fraction


@dataclasses.dataclass(frozen=True)
class HeldOutPlan:
    """Per source: the training spec (with its holdout carved out) and the held-out
    spec (None when the source has no held-out part)."""

    train: list[SourceSpec]
    heldout: list[SourceSpec | None]


def plan_holdout(data: Data, eval_cfg: Any) -> HeldOutPlan:
    """Resolve ``[data]`` and ``[eval]`` into training and held-out specs.

    ``eval_cfg`` is the ``[eval]`` section (None: no held-out parts). Raises
    :class:`ConfigError` naming the ``[eval]`` key and the fix.
    """
    specs = resolve_sources(data)
    n = len(specs)
    if eval_cfg is None or n == 0:
        return HeldOutPlan(specs, [None] * n)
    fractions = per_source("eval", "holdout_fraction", list(eval_cfg.holdout_fraction), n, 0.0)
    locations = per_source("eval", "datasets", list(eval_cfg.datasets), n, "")
    splits = per_source("eval", "splits", list(eval_cfg.splits), n, "")
    train: list[SourceSpec] = []
    heldout: list[SourceSpec | None] = []
    for i, (spec, fraction, location, split) in enumerate(zip(specs, fractions, locations, splits)):
        if not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or not 0 <= fraction < 1:
            raise ConfigError(
                f"[eval] holdout_fraction[{i}] = {fraction!r}: must be >= 0 and < 1 "
                "(0: no hash holdout for that source)"
            )
        separate = bool(location) or (bool(split) and split != spec.split)
        if separate and fraction > 0:
            raise ConfigError(
                f"[eval] source {spec.name!r} has both holdout_fraction {fraction} and a held-out "
                f"{'dataset' if location else 'split'}; give one of them (set holdout_fraction[{i}] = 0 "
                "or datasets/splits[i] = \"\")"
            )
        if fraction > 0:
            train.append(dataclasses.replace(spec, holdout=float(fraction)))
            heldout.append(dataclasses.replace(
                spec, holdout=float(fraction), heldout_only=True, prob=1.0, on_exhaustion="drop"
            ))
            continue
        train.append(spec)
        if not separate:
            heldout.append(None)
            continue
        if not location and spec.kind != "hub":
            raise ConfigError(
                f"[eval] splits[{i}] = {split!r}: source {spec.name!r} is a local {spec.kind} source, "
                f"which has one split; point [eval] datasets[{i}] at its held-out file instead"
            )
        one = dataclasses.replace(
            data, datasets=[location or spec.location], names=[spec.name], sampling_probs=[],
            splits=[split or spec.split], text_fields=[spec.text_field], on_exhaustion=["drop"],
        )
        try:
            (resolved,) = resolve_sources(one)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("[data] datasets[0]", f"[eval] datasets[{i}]")) from None
        heldout.append(resolved)
    return HeldOutPlan(train, heldout)


def training_sources(data: Data, eval_cfg: Any) -> list[SourceSpec]:
    """The ``[data]`` sources as training reads them: hash holdouts carved out."""
    return plan_holdout(data, eval_cfg).train
