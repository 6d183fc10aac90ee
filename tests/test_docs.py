"""The documentation cannot drift from the code.

README.md and docs/*.md are read once. What they name must exist: repository
paths, ``ext.*`` modules and names, ``python -m ext.cli`` subcommands and their
options, config keys (``[section] key``, ``section.key``, ``--section.key`` and
TOML blocks). docs/config.md lists exactly the keys of our config sections,
with their defaults. Relative links resolve, and README links to every page.

Commands are marked in the markdown by an HTML comment on the line before a
fenced block:

* ``<!-- ci: run -->``: every line of the block is run from the repository root
  (``python`` is this interpreter) and must exit 0. A later block marked
  ``<!-- ci: output -->`` holds lines the command must print.
* ``<!-- ci: check -->``: the ``./run_train.sh ARGS`` lines of the block are not
  trained; ``python -m ext.cli check ARGS`` must pass instead.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*ci:\s*(run|check|output)\s*-->\s*$")
SPAN = re.compile(r"`([^`]+)`")  # a code span may wrap onto the next line
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH_ROOTS = ("ext/", "tests/", "benchmarks/", "train_configs/", "scripts/", "docs/", ".ci/")
TOP_FILES = {"README.md", "run_train.sh", "run_tests.sh", "pyproject.toml", "requirements.lock"}
PLACEHOLDER = re.compile(r"[<>*{}$]")


@dataclasses.dataclass
class Block:
    page: Path
    lang: str
    text: str
    marker: str | None  # "run", "check", "output" or None


def _blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        blocks.append(Block(page, m.group(1), m.group(2), marker.group(1) if marker else None))
    return blocks


def _prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


BLOCKS = [b for page in PAGES for b in _blocks(page)]
SPANS = [(page, " ".join(s.split())) for page in PAGES for s in SPAN.findall(_prose(page))]


CODE_LANGS = ("bash", "sh", "toml", "python")  # blocks without a language show output or logs


def _code_texts() -> list[tuple[Path, str]]:
    """Inline code spans and code blocks, the places where names are written."""
    return SPANS + [(b.page, b.text) for b in BLOCKS if b.lang in CODE_LANGS]


def _command_lines(text: str) -> list[str]:
    """Logical lines of a shell block: continuations joined, comments dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


# ------------------------------------------------------------------ (a) paths and modules

def _path_tokens(text: str) -> set[str]:
    found = set()
    for token in re.split(r"[\s\"'(),=\[\]]+", text):
        token = token.rstrip(".,:;")
        token = token[2:] if token.startswith("./") else token
        if PLACEHOLDER.search(token):
            continue
        if token.startswith(PATH_ROOTS) or token in TOP_FILES:
            found.add(token)
    return found


def test_every_repository_path_named_in_the_docs_exists():
    missing = []
    for page, text in _code_texts():
        for token in _path_tokens(text):
            path, _, test_name = token.partition("::")
            if not (REPO / path).exists():
                missing.append(f"{_rel(page)}: {token}")
            elif test_name and not re.search(rf"^def {re.escape(test_name)}\(", (REPO / path).read_text(), re.M):
                missing.append(f"{_rel(page)}: {token} (no such test)")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(sorted(set(missing)))


def _module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(module: Path) -> set[str]:
    """Names a module defines or imports at top level (a submodule counts too)."""
    names = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_ext_module_and_name_in_the_docs_exists():
    problems = []
    for page, text in _code_texts():
        for dotted in set(re.findall(r"(?<![\w/.])ext(?:\.\w+)+", text)):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):
                module = _module_file(parts[:i])
                if module is not None:
                    break
            if module is None or i == 1 and len(parts) > 1:
                problems.append(f"{_rel(page)}: {dotted} (no such module)")
                continue
            if i < len(parts) and parts[i] not in _top_level_names(module):
                problems.append(f"{_rel(page)}: {dotted} ({parts[i]} is not defined in {module.relative_to(REPO)})")
    assert not problems, "\n".join(sorted(set(problems)))


# ------------------------------------------------------------------ (b) CLI commands

@pytest.fixture(scope="module")
def cli_commands():
    from ext.cli import COMMANDS

    return COMMANDS


def test_every_cli_subcommand_in_the_docs_exists(cli_commands):
    named = set()
    for page, text in _code_texts():
        for sub in re.findall(r"python -m ext\.cli\s+([\w-]+)", text):
            if not sub.startswith("-"):  # --help
                named.add((_rel(page), sub))
    unknown = [f"{page}: {sub}" for page, sub in sorted(named) if sub not in cli_commands]
    assert not unknown, f"not subcommands of python -m ext.cli ({sorted(cli_commands)}):\n" + "\n".join(unknown)
    # every subcommand is documented somewhere
    undocumented = set(cli_commands) - {sub for _, sub in named}
    assert not undocumented, f"subcommands the docs never show: {sorted(undocumented)}"


def test_cli_commands_in_code_blocks_parse(cli_commands):
    """Options shown in a block are the options the subcommand takes."""
    problems = []
    for block in BLOCKS:
        if block.lang not in ("bash", "sh", ""):
            continue
        for line in _command_lines(block.text):
            m = re.match(r"(?:\w+=\S+\s+)*python -m ext\.cli\s+([\w-]+)(.*)", line)
            if not m or m.group(1) not in cli_commands:
                continue
            command = cli_commands[m.group(1)]
            args = shlex.split(re.sub(r"\[[^\]]*\]", " ", m.group(2)))  # [--optional ...] in a synopsis
            if "--help" in args or "-h" in args:
                continue
            parser = argparse.ArgumentParser(allow_abbrev=False)
            command.add_arguments(parser)
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    _, rest = parser.parse_known_args(args)
            except SystemExit:
                problems.append(f"{_rel(block.page)}: {line}\n  {err.getvalue().strip()}")
                continue
            extra = [a for a in rest if a.startswith("-") and not (command.config_args and "." in a)]
            if extra:
                problems.append(f"{_rel(block.page)}: {line}\n  unknown options {extra}")
    assert not problems, "\n".join(problems)


def test_python_m_modules_in_the_docs_exist():
    missing = []
    for page, text in _code_texts():
        for module in re.findall(r"python -m (ext(?:\.\w+)+)", text):
            if _module_file(module.split(".")) is None:
                missing.append(f"{_rel(page)}: python -m {module}")
    assert not missing, "\n".join(sorted(set(missing)))


# ------------------------------------------------------------------ (c) config keys

@pytest.fixture(scope="module")
def job_config():
    """The merged JobConfig (torchtitan's sections and ours), as training builds it."""
    from ext.cli import load_job_config

    return load_job_config(["--job.config_file", str(REPO / "train_configs" / "debug.toml")])


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.replace("-", "_").split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _named_keys(config) -> list[tuple[Path, str]]:
    sections = {f.name for f in dataclasses.fields(config)}
    keys = []
    for page, text in _code_texts():
        for section, key in re.findall(r"\[([a-z_]+(?:\.[a-z_]+)?)\]\s+([a-z_]+)\b", text):
            keys.append((page, f"{section}.{key}"))
        for option in re.findall(r"(?<![\w-])--([a-z][\w-]*\.[a-z][\w.-]*)", text):
            if option.rstrip(".") != "section.key":  # the placeholder of "any --section.key value"
                keys.append((page, option.rstrip(".")))
    for page, span in SPANS:
        m = re.fullmatch(r"([a-z_]+)\.([a-z_]+)", span)
        if m and m.group(1) in sections:
            keys.append((page, span))
    return keys


def _toml_keys(table: dict, node, prefix: str = "") -> list[str]:
    """Dotted keys of a TOML table; a table is a section where the config has one there."""
    keys = []
    for key, value in table.items():
        child = getattr(node, key, None)
        if isinstance(value, dict) and dataclasses.is_dataclass(child):
            keys.extend(_toml_keys(value, child, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_config_key_named_in_the_docs_exists(job_config):
    unknown = [f"{_rel(page)}: {key}" for page, key in _named_keys(job_config) if not _has_key(job_config, key)]
    assert not unknown, "config keys the JobConfig does not have:\n" + "\n".join(sorted(set(unknown)))


def test_toml_blocks_parse_and_use_real_keys(job_config):
    problems = []
    for block in BLOCKS:
        if block.lang != "toml":
            continue
        try:
            table = tomllib.loads(block.text)
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{_rel(block.page)}: not valid TOML ({exc}):\n{block.text}")
            continue
        for key in _toml_keys(table, job_config):
            if "." not in key or not _has_key(job_config, key):  # a bare top-level key is no section
                problems.append(f"{_rel(block.page)}: {key}")
    assert not problems, "TOML keys the JobConfig does not have:\n" + "\n".join(problems)


def _config_md_tables() -> dict[str, dict[str, str]]:
    """``{section: {key: default cell}}`` from docs/config.md's ``## `[section]` `` tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in (REPO / "docs" / "config.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `\[([a-z_]+)\]`\s*$", line)
        if heading:
            section = heading.group(1)
            tables[section] = {}
        elif line.startswith("## "):
            section = None
        elif section:
            row = re.match(r"^\| `([a-z_]+)` \| ([^|]+) \|", line)
            if row:
                assert row.group(1) not in tables[section], f"[{section}] {row.group(1)} listed twice"
                tables[section][row.group(1)] = row.group(2).strip()
    return tables


def test_config_reference_lists_every_key_of_our_sections_with_its_default():
    import ext.job_config as ours

    tables = _config_md_tables()
    defaults = ours.JobConfig()
    problems = []
    for section in dataclasses.fields(ours.JobConfig):
        documented = tables.pop(section.name, None)
        if documented is None:
            problems.append(f"[{section.name}]: no '## `[{section.name}]`' table in docs/config.md")
            continue
        instance = getattr(defaults, section.name)
        fields = {f.name for f in dataclasses.fields(instance)}
        for key in sorted(fields - set(documented)):
            problems.append(f"[{section.name}] {key}: missing from docs/config.md")
        for key in sorted(set(documented) - fields):
            problems.append(f"[{section.name}] {key}: in docs/config.md but not a key of the section")
        for key in sorted(fields & set(documented)):
            cell, value = documented[key], getattr(instance, key)
            if cell == "unset":
                ok = value is None
            else:
                literal = re.fullmatch(r"`(.+)`", cell)
                try:
                    ok = literal is not None and tomllib.loads(f"v = {literal.group(1)}")["v"] == value
                except tomllib.TOMLDecodeError:
                    ok = False
            if not ok:
                problems.append(f"[{section.name}] {key}: docs/config.md says {cell}, the default is {value!r}")
    for section in tables:
        problems.append(f"[{section}]: documented in docs/config.md but not one of our sections")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ (d) marked commands

RUN = []
for _i, _block in enumerate(BLOCKS):
    if _block.marker != "run":
        continue
    _expected = []
    _next = BLOCKS[_i + 1] if _i + 1 < len(BLOCKS) else None
    if _next is not None and _next.page == _block.page and _next.marker == "output":
        _expected = [line.split() for line in _next.text.splitlines() if line.strip()]
    for _line in _command_lines(_block.text):
        RUN.append((_rel(_block.page), _line, _expected))

CHECK = sorted({
    (_rel(b.page), line.split("./run_train.sh", 1)[1].strip())
    for b in BLOCKS if b.marker == "check"
    for line in _command_lines(b.text) if "./run_train.sh" in line
})


def test_the_marked_sets_are_small_and_not_empty():
    assert 1 <= len(RUN) <= 6, RUN  # each costs an interpreter start with torch and torchtitan
    assert CHECK


@pytest.fixture(scope="module", autouse=True)
def run_results():
    """Start every marked command when the module's first test starts, so that their
    interpreter start-ups (mostly imports) overlap the other tests; wait for them
    where a test needs the results."""
    procs = {}
    for _, line, _ in RUN:
        args = shlex.split(line)
        assert args[0] == "python", f"a ci: run line starts with python: {line}"
        procs.setdefault(line, subprocess.Popen(
            [sys.executable, *args[1:]], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))

    class Results(dict):
        def __missing__(self, line):
            proc = procs[line]
            out, err = proc.communicate(timeout=300)
            self[line] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            return self[line]

    yield Results()
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("page,line,expected", RUN, ids=[f"{p}: {c}" for p, c, _ in RUN])
def test_marked_commands_run(run_results, page, line, expected):
    proc = run_results[line]
    assert proc.returncode == 0, f"{page}: {line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    printed = [out_line.split() for out_line in proc.stdout.splitlines()]
    missing = [" ".join(want) for want in expected if want not in printed]
    assert not missing, f"{page}: {line} no longer prints:\n" + "\n".join(missing) + "\n--- it prints:\n" + proc.stdout


@pytest.mark.parametrize("page,args", CHECK, ids=[f"{p}: {a}" for p, a in CHECK])
def test_training_commands_pass_the_check(job_config, page, args, capsys, monkeypatch):
    from ext.cli import main

    monkeypatch.chdir(REPO)  # the shipped configs name paths relative to the repository root
    code = main(["check", *shlex.split(args)])
    out, err = capsys.readouterr()
    assert code == 0, f"{page}: ./run_train.sh {args}\n{out}\n{err}"


# ------------------------------------------------------------------ (e) README and links

def test_readme_is_short_and_links_every_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    linked = {target.split("#")[0] for target in LINK.findall(README.read_text(encoding="utf-8"))}
    unlinked = [f"docs/{page.name}" for page in DOCS if f"docs/{page.name}" not in linked]
    assert not unlinked, f"pages README.md does not link: {unlinked}"


def test_ci_runs_the_readme_test_command():
    two_commands = next(b for b in _blocks(README) if "./run_tests.sh" in b.text)
    command = next(line for line in _command_lines(two_commands.text) if line.startswith("./run_tests.sh"))
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci, f".ci/run does not run the README's test command {command!r}"


def _slug(heading: str) -> str:
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{_rel(page)}: {target}")
            elif anchor:
                headings = re.findall(r"^#+\s+(.*)$", resolved.read_text(encoding="utf-8"), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{_rel(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
