"""Config keys a newcomer mistypes: one line each, with the likely key.

torchtitan rejects an unknown TOML key with a multi-line ``Invalid field
names in <class ...>`` error that names neither the section nor the fix, and
tyro's box for a command-line typo points at ``<the script> --help``. Both
entry points (``python -m ext.cli`` and ``python -m ext.train``) use
:func:`unknown_toml_keys` before torchtitan parses and :func:`help_prog` as
the program name tyro shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import typing
from typing import Any, Iterator


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key in names:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def config_file_of(argv: list[str]) -> str | None:
    """The ``--job.config_file`` (either spelling) of ``argv``, or None."""
    return _option(argv, "--job.config_file", "--job.config-file")


def help_prog(argv: list[str]) -> str:
    """What tyro should show as the program: ``<prog> --help`` then lists every
    trainer option (run_train.sh routes ``--help`` after other arguments, and
    ``--trainer-help``, to the trainer's help)."""
    config_file = config_file_of(argv)
    return f"./run_train.sh --job.config_file {config_file}" if config_file else "./run_train.sh --trainer-help"


@contextlib.contextmanager
def tyro_prog(argv: list[str]) -> Iterator[None]:
    """Within the block, tyro names :func:`help_prog` in its help and error boxes."""
    saved = sys.argv[0]
    sys.argv[0] = help_prog(argv)
    try:
        yield
    finally:
        sys.argv[0] = saved


def _close(name: str, choices: list[str]) -> str | None:
    hit = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not hit:  # seqlen vs seq_len, dump-folder vs dump_folder
        flat = {c.replace("_", "").replace("-", ""): c for c in choices}
        return flat.get(name.replace("_", "").replace("-", ""))
    return hit[0]


def unknown_toml_keys(values: dict[str, Any], config_cls: type, path: str = "") -> list[str]:
    """One line per TOML key or section of ``values`` that ``config_cls`` (the
    merged JobConfig dataclass) does not have, each with the closest valid name."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls)}
    problems = []
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            guess = _close(key, list(fields))
            if not path:
                hint = f"; did you mean [{guess}]?" if guess else ""
                problems.append(f"[{key}] is not a config section{hint} "
                                "(./run_train.sh --trainer-help lists every section and key)")
            else:
                hint = f"; did you mean `{guess}`?" if guess else ""
                problems.append(f"[{path}] {key} is not a key of [{path}]{hint} "
                                f"(./run_train.sh --trainer-help lists them)")
            continue
        tp = fields[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            problems.extend(unknown_toml_keys(value, tp, where))
    return problems


def toml_key_problems(argv: list[str], toml_values: dict[str, Any] | None) -> list[str]:
    """:func:`unknown_toml_keys` of the config torchtitan would build from ``argv``
    (its JobConfig merged with the ``custom_config_module`` the arguments or TOML name)."""
    if not toml_values:
        return []
    from torchtitan.config import ConfigManager

    config_cls = ConfigManager()._maybe_add_custom_config(argv, toml_values)
    return unknown_toml_keys(toml_values, config_cls)
