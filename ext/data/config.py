"""The ``[data]`` section: sources, mixture, packing, workers.

Sources are parallel lists (one entry per source), so a TOML reads::

    [data]
    datasets = ["data/web", "data/code.jsonl"]
    sampling_probs = [0.7, 0.3]

``splits``, ``text_fields`` and ``on_exhaustion`` take either one entry
(applied to every source) or one per source. :func:`resolve_sources` checks
all of it and returns one :class:`SourceSpec` per source; every problem is a
:class:`ConfigError` whose message names the key and the fix.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ext.core.errors import ConfigError

LOCAL_FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "txt",
    ".txt.gz": "txt",
    ".txt.zst": "txt",
}
EXHAUSTION = ("restart", "drop")


@dataclass
class Data:
    """Packed multi-source pretraining data (used when ``datasets`` is non-empty)."""

    datasets: list[str] = field(default_factory=list)
    """
    One location per source: a local file, a folder of files of one kind
    (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet, .arrow, .txt, .txt.gz,
    .txt.zst; .txt = one document per line), or a Hugging Face Hub dataset id
    (streamed by `datasets`, nothing downloaded whole; needs a network). Empty: the train spec falls back to torchtitan's
    `training.dataset` loader.
    """

    names: list[str] = field(default_factory=list)
    """Source names for logs and metrics; default: file or folder name."""

    sampling_probs: list[float] = field(default_factory=list)
    """
    Target share of each source, normalized to sum to 1; default: equal. Shares
    of trained *tokens* when `mixture_unit = "tokens"` (the default), of
    documents when "documents".
    """

    mixture_unit: Literal["tokens", "documents"] = "tokens"
    """What `sampling_probs` are shares of."""

    splits: list[str] = field(default_factory=lambda: ["train"])
    """Split per source (Hub datasets; local files are one split named as given)."""

    text_fields: list[str] = field(default_factory=lambda: ["text"])
    """Record field holding the document text, per source."""

    on_exhaustion: list[str] = field(default_factory=lambda: ["restart"])
    """
    Per source, when its records are spent: "restart" (new epoch, reshuffled,
    logged) or "drop" (leave the mixture; the others are renormalized). When
    every source is dropped, training ends cleanly on every rank.
    """

    shuffle: bool = True
    """
    Each epoch, visit a source's ranges in a fresh seeded order and the records
    of each range in a seeded order (see ext/data/sources.py).
    """

    packing: Literal["bfd", "greedy"] = "bfd"
    """
    "bfd": best-fit-decreasing over a buffer of documents (cuts only documents
    longer than a row). "greedy": concatenate-and-chunk, as torchtitan does.
    """

    buffer_docs: int = 2048
    """Documents packed together; larger packs tighter and uses more memory."""

    add_bos: bool = True
    """Start every document with the tokenizer's BOS token (if it has one)."""

    add_eos: bool = True
    """End every document with the tokenizer's EOS token (if it has one)."""

    reset_positions: bool = False
    """Position ids restart at 0 in every document (sent to the model as `positions`)."""

    bad_records: Literal["skip", "error"] = "skip"
    """
    A malformed record (bad JSON, bad UTF-8, a lone surrogate, a missing, null,
    non-string or empty text), in any format: "skip" counts it per source and
    warns with file:line (or file:row N); "error" stops with that message.
    """

    num_workers: int | str = "auto"
    """
    DataLoader worker processes per rank: an integer (`num_workers = 2`; the
    string "2" is accepted too), or "auto" = CPU cores per local rank minus
    one, at most 8.
    """


@dataclass
class Sft:
    """Chat supervised fine-tuning: every [data] source holds conversations."""

    enable: bool = False
    """
    Treat [data] sources as chat samples: `text_fields` name the conversation
    field: "messages" (OpenAI: role, content, tool_calls, reasoning_content,
    name, tool_call_id, ...; content may be null) or "conversations"
    (ShareGPT: from/value, incl. function_call and observation turns), or an
    object holding them with the sample's `tools`. Each sample is rendered
    with the chat template and packed as one segment.
    """

    train_roles: list[str] = field(default_factory=lambda: ["assistant"])
    """Roles whose turns are trained (system, user, assistant, tool); default assistant only."""

    last_turn_only: bool = False
    """Train only the last turn of a trained role in each sample."""

    template_file: str = ""
    """Jinja chat template file replacing the tokenizer's (empty: the tokenizer's own)."""

    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """
    Extra variables for every render of the chat template, e.g.
    `template_kwargs = {enable_thinking = false}` (Qwen3, SmolLM3).
    """

    mask_method: Literal["auto", "generation", "prefix"] = "auto"
    """
    Where an assistant turn's trained span comes from, with one rule for both:
    the tokens the template renders for the turn after its header, through its
    end-of-turn token. "generation": the template's {% generation %} tags (any
    whitespace control; a header inside them is trimmed); "prefix": the turn
    boundaries of one render (what rendering prefixes gives); "auto":
    generation when the template has the tags, else prefix.
    """

    train_empty_think: bool = False
    """
    Train the empty `<think></think>` block a template adds to a turn without
    reasoning (Qwen3's last turn); false leaves it untrained.
    """

    dropped_reasoning: Literal["train", "untrained"] = "train"
    """
    An assistant turn whose reasoning_content the template does not render
    (Qwen3 drops it for turns before the last user message): "train" trains
    what is rendered (answer, tool calls), "untrained" keeps the turn as
    context only.
    """

    overlong: Literal["drop", "truncate"] = "drop"
    """
    A sample longer than a row (seq_len + 1 tokens): "drop" it (counted), or
    "truncate" it after its last complete trained turn that fits (counted;
    dropped when none fits), never inside a reply.
    """


@dataclass(frozen=True)
class SourceSpec:
    """One resolved source."""

    name: str
    location: str
    kind: str  # "jsonl" | "json" | "parquet" | "arrow" | "txt" | "hub" | "tokens"
    files: tuple[str, ...]  # empty for hub
    split: str
    text_field: str
    prob: float
    on_exhaustion: str
    # Hash holdout (ext.data.holdout, set from [eval]): records whose content hash is
    # below `holdout` are skipped, or with `heldout_only` are the only ones read.
    holdout: float = 0.0
    heldout_only: bool = False


_NO_DEFAULT = object()


def per_source(section: str, key: str, values: list, n: int, default: Any = _NO_DEFAULT) -> list:
    """A list key of ``[section]`` as one value per ``[data] datasets`` source:
    one entry is used for every source, otherwise there must be one per
    source. An empty list gives ``default`` for every source (an error when
    there is no default)."""
    if not values and default is not _NO_DEFAULT:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        datasets = "datasets" if section == "data" else "[data] datasets"
        raise ConfigError(
            f"[{section}] {key} has {len(values)} entries but {datasets} has {n}; "
            "give one entry for all sources or one per source"
        )
    return list(values)


# kind -> file extensions it reads (the `datasets` json builder reads JSON Lines too)
_KIND_EXTENSIONS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst"),
    "json": (".json", ".jsonl", ".jsonl.gz", ".jsonl.zst"),
    "parquet": (".parquet",),
    "arrow": (".arrow",),
    "txt": (".txt", ".txt.gz", ".txt.zst"),
}
# side files that `Dataset.save_to_disk` writes next to its .arrow files
_SAVE_TO_DISK_FILES = frozenset({"state.json", "dataset_info.json"})
# "name" or "owner/name": what a Hub dataset id looks like
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def data_extension(name: str) -> str:
    """The data extension of a file name, compression included (".jsonl.zst"), lower case."""
    lower = name.lower()
    for ext in LOCAL_FORMATS:
        if ext.count(".") == 2 and lower.endswith(ext):
            return ext
    return os.path.splitext(lower)[1]


def local_data_files(location: str, fmt: str = "auto") -> tuple[str, tuple[str, ...]]:
    """(kind, sorted data files) of a local file or folder.

    ``kind`` is one of ``LOCAL_FORMATS``' values. ``fmt`` other than "auto"
    forces the kind: a file is then taken as is, and a folder contributes the
    files with that kind's extensions. In a folder, names starting with "." or
    "_" and files of other extensions are ignored; a ``Dataset.save_to_disk``
    folder is arrow data (its ``state.json``/``dataset_info.json`` are
    metadata); .jsonl beside .json files are all read as "json".

    Raises :class:`ConfigError` with a one-line message that names the location
    and the fix but no config key (the caller adds that context).
    """
    if fmt != "auto" and fmt not in _KIND_EXTENSIONS:
        raise ConfigError(f"unknown format {fmt!r}; use one of auto, {', '.join(_KIND_EXTENSIONS)}")
    if not os.path.exists(location):
        raise ConfigError(f"{location!r} does not exist; give a local data file or folder")
    if os.path.isfile(location):
        if fmt != "auto":
            return fmt, (location,)
        ext = data_extension(location)
        if ext not in LOCAL_FORMATS:
            raise ConfigError(
                f"cannot tell the kind of {location!r} from its extension {ext or '(none)'!r}; "
                f"use one of {', '.join(LOCAL_FORMATS)}"
            )
        return LOCAL_FORMATS[ext], (location,)

    names = sorted(
        n for n in os.listdir(location)
        if not n.startswith((".", "_")) and os.path.isfile(os.path.join(location, n))
    )
    if fmt in ("auto", "tokens") and (TOKEN_METADATA in names or any(n.endswith(".ds") for n in names)):
        return "tokens", token_folder_files(location)
    if _SAVE_TO_DISK_FILES <= set(names):  # a `save_to_disk` folder: its .json files are metadata
        names = [n for n in names if n not in _SAVE_TO_DISK_FILES]
        if fmt == "auto" and not any(n.lower().endswith(".arrow") for n in names):
            # `save_to_disk` of an empty dataset writes no .arrow file
            raise ConfigError(
                f"folder {location!r} is a save_to_disk dataset with no records; point at non-empty data"
            )
    if fmt != "auto":
        kind = fmt
        chosen = [n for n in names if data_extension(n) in _KIND_EXTENSIONS[fmt]]
    else:
        by_ext: dict[str, list[str]] = {}
        for n in names:
            ext = data_extension(n)
            if ext in LOCAL_FORMATS:
                by_ext.setdefault(ext, []).append(n)
        kinds = {LOCAL_FORMATS[ext] for ext in by_ext}
        if kinds == {"jsonl", "json"}:
            kinds = {"json"}
        if len(kinds) > 1:
            found = ", ".join(f"{len(v)} {ext}" for ext, v in sorted(by_ext.items()))
            raise ConfigError(
                f"folder {location!r} mixes data file kinds ({found}); keep one kind per folder"
            )
        kind = kinds.pop() if kinds else ""
        chosen = [n for v in by_ext.values() for n in v]
    if not chosen:
        wanted = ", ".join(_KIND_EXTENSIONS[fmt]) if fmt != "auto" else ", ".join(LOCAL_FORMATS)
        raise ConfigError(
            f"folder {location!r} holds no data files ({wanted}); put data files there "
            "or point at a data file or another folder"
        )
    return kind, tuple(sorted(os.path.join(location, n) for n in chosen))


TOKEN_METADATA = "ext_tokenized.json"  # ext.data.tokenized.METADATA_FILE


def token_folder_files(location: str) -> tuple[str, ...]:
    """The ``.ds`` token files of a token folder (``python -m ext.cli tokenize``),
    in the order its metadata lists them. Raises ConfigError (one line) for a
    folder of ``.ds`` files without our metadata, whose tokenizer cannot be checked."""
    from ext.data.tokenized import read_token_metadata
    from ext.core.errors import DataError

    try:
        info = read_token_metadata(location)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    return tuple(os.path.join(location, entry["file"]) for entry in info["shards"])


def looks_like_hub_id(location: str) -> bool:
    """Whether ``location`` reads as a Hub dataset id ("name" or "owner/name"), not a data file path."""
    return (
        _HUB_ID.match(location) is not None
        and data_extension(location) not in LOCAL_FORMATS
    )


def resolve_sources(cfg: Data) -> list[SourceSpec]:
    """Check ``[data]`` and return one spec per source (empty list: section unused)."""
    for key in ("datasets", "names", "sampling_probs", "splits", "text_fields", "on_exhaustion"):
        if not isinstance(getattr(cfg, key), list):
            raise ConfigError(f"[data] {key} must be a list, e.g. {key} = [...]")
    n = len(cfg.datasets)
    if n == 0:
        return []
    probs = list(cfg.sampling_probs) or [1.0] * n
    if len(probs) != n:
        raise ConfigError(
            f"[data] sampling_probs has {len(probs)} entries but datasets has {n}"
        )
    for i, p in enumerate(probs):
        if not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise ConfigError(f"[data] sampling_probs[{i}] = {p!r}: must be a finite number >= 0")
    if sum(probs) <= 0:
        raise ConfigError("[data] sampling_probs sum to 0: give at least one source a positive share")
    total = float(sum(probs))
    names = list(cfg.names) if cfg.names else []
    if names and len(names) != n:
        raise ConfigError(f"[data] names has {len(names)} entries but datasets has {n}")
    splits = per_source("data", "splits", list(cfg.splits), n)
    fields = per_source("data", "text_fields", list(cfg.text_fields), n)
    exhaust = per_source("data", "on_exhaustion", list(cfg.on_exhaustion), n)
    for i, e in enumerate(exhaust):
        if e not in EXHAUSTION:
            raise ConfigError(f"[data] on_exhaustion[{i}] = {e!r}: use one of {list(EXHAUSTION)}")
    if cfg.buffer_docs < 1:
        raise ConfigError(f"[data] buffer_docs = {cfg.buffer_docs}: must be >= 1")
    parse_num_workers(cfg.num_workers)
    if cfg.packing not in ("bfd", "greedy"):
        raise ConfigError(f"[data] packing = {cfg.packing!r}: use \"bfd\" or \"greedy\"")

    specs = []
    for i, location in enumerate(cfg.datasets):
        if os.path.exists(location):
            try:
                kind, files = local_data_files(location)
            except ConfigError as exc:
                raise ConfigError(f"[data] datasets[{i}] {exc}") from None
            base = os.path.basename(os.path.normpath(location))
            ext = data_extension(base) if os.path.isfile(location) else os.path.splitext(base)[1]
            default_name = base[: len(base) - len(ext)] if ext else base
        elif looks_like_hub_id(location):
            kind, files, default_name = "hub", (), location.split("/")[-1]
        else:
            raise ConfigError(
                f"[data] datasets[{i}] {location!r} does not exist; give a local file or "
                "folder (relative to where you launch) or a Hub id like 'org/name'"
            )
        specs.append(
            SourceSpec(
                name=names[i] if names else default_name,
                location=location,
                kind=kind,
                files=files,
                split=splits[i],
                text_field=fields[i],
                prob=probs[i] / total,
                on_exhaustion=exhaust[i],
            )
        )
    seen = [s.name for s in specs]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"[data] source names must be unique, got {seen}; set [data] names")
    return specs


def parse_num_workers(value: str | int) -> int | None:
    """``"auto"`` -> None, an integer >= 0 (or its string) -> that integer."""
    if (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, str) and value.strip().isdigit()
    ):
        return int(value)
    if isinstance(value, str) and value.strip() == "auto":
        return None
    raise ConfigError(f"[data] num_workers = {value!r}: use \"auto\" or an integer >= 0")
