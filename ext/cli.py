"""Command-line tools: ``python -m ext.cli COMMAND [options] [--section.key value ...]``.

Commands:

* ``lr-schedule``: print the LR schedule a config trains with (step and LR at
  about 20 steps: the first, the end of warmup, the start of the decay, the
  last, and evenly spaced ones between) and plot it to ``lr_schedule.png``
  when matplotlib is installed (``pip install -e .[plot]``).

* ``check``: every problem of a training config, one line each, exit 2 when
  there is any (``run_train.sh`` runs it before starting torchrun); see
  :mod:`ext.preflight`.

* ``dcp-to-hf``: convert a DCP checkpoint to a Hugging Face folder (sharded
  safetensors, index, config, generation config, tokenizer); see
  :mod:`ext.export`.

* ``reshard``: rewrite a data source into N parquet shards; see :mod:`ext.data.reshard`.

* ``tokenize``: write a source as pre-tokenized token shards (datatrove's
  ``.ds`` layout) that training reads memory-mapped; see :mod:`ext.data.tokenized`.

Commands marked ``config_args`` read the trainer's config exactly as training
does: ``--job.config_file X`` plus any ``--section.key value`` overrides, parsed
by torchtitan's ConfigManager with ``ext.job_config``. A bad setting ends the
command with one line on stderr and exit status 2.

To add a command, write ``add_arguments(parser)`` and ``run(args, config_argv)
-> int`` and :func:`register` a :class:`Command`; :func:`load_job_config`
turns ``config_argv`` into the JobConfig.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tomllib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ext.core.errors import ConfigError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    config_args: bool = False
    """Unrecognized ``--section.key`` options are trainer config arguments."""


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    COMMANDS[command.name] = command
    return command


def load_job_config(argv: list[str]) -> Any:
    """The JobConfig training would build from ``argv`` (torchtitan's arguments)."""
    import ext.job_config  # noqa: F401  (our sections and specs)
    from ext.train import with_config_module
    from torchtitan.config import ConfigManager

    argv = with_config_module(list(argv))
    config_file = None
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            config_file = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    if config_file is not None and not os.path.isfile(config_file):
        raise ConfigError(f"--job.config_file {config_file!r} does not exist; give the path of a TOML config")
    toml_values = None
    if config_file is not None:
        try:  # here, before torchtitan, which logs a traceback for a bad TOML
            with open(config_file, "rb") as f:
                toml_values = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: not valid TOML ({exc})") from None
    from ext.config_keys import toml_key_problems, tyro_prog

    typos = toml_key_problems(argv, toml_values)  # torchtitan's own message names no section, no fix
    if typos:
        raise ConfigError("; ".join(f"{config_file}: {t}" for t in typos))
    try:
        with warnings.catch_warnings(), tyro_prog(argv), _quiet_assets_warning():  # tyro warns about
            warnings.simplefilter("ignore", UserWarning)  # mistyped TOML values; preflight reports them
            return ConfigManager().parse_args(argv)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file}: not valid TOML ({exc})") from None
    except ConfigError:
        raise
    except ValueError as exc:  # torchtitan's unknown-key error spans lines
        raise ConfigError(" ".join(str(exc).split())) from None


@contextlib.contextmanager
def _quiet_assets_warning():
    """Drop torchtitan's unprefixed ``HF assets path X does not exist!`` warning
    while parsing: the check reports a missing [model] hf_assets_path itself."""
    from torchtitan.tools.logging import logger

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("HF assets path ")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


# ------------------------------------------------------------------ lr-schedule


def schedule_rows(key_steps: dict[int, str], last: int, rows: int) -> list[int]:
    """``key_steps`` plus evenly spaced steps in [1, last], about ``rows`` in all."""
    if last <= rows:
        return list(range(1, last + 1))
    chosen = {s for s in key_steps if 1 <= s <= last}
    spare = max(rows - len(chosen), 2)
    chosen.update(round(1 + i * (last - 1) / (spare - 1)) for i in range(spare))
    return sorted(chosen)


def key_steps(factors: list[float]) -> dict[int, str]:
    """Label the landmarks of a schedule from its factors at steps 1..n."""
    n = len(factors)
    marks = {1: "first"}
    at_peak = [s for s, f in enumerate(factors, start=1) if f >= 1.0 - 1e-12]
    if at_peak:
        if at_peak[0] > 1:
            marks[at_peak[0]] = "warmup end"
        if at_peak[-1] < n:
            marks[at_peak[-1] + 1] = "decay start"
    marks[n] = "last"
    return marks


def _plot(path: str, steps: list[int], lrs: list[float], title: str, marks: dict[int, str]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or pip install -e .[plot])"
    stride = max(1, len(steps) // 20000)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps[::stride] + steps[-1:], lrs[::stride] + lrs[-1:], lw=1.5)
    for step, label in marks.items():
        if label in ("warmup end", "decay start"):
            ax.axvline(step, color="grey", ls=":", lw=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def _lr_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", default="lr_schedule.png", metavar="PATH",
                        help='PNG to write (default: lr_schedule.png); "" for none')
    parser.add_argument("--rows", type=int, default=20, help="about how many steps to print (default 20)")


def _needs_config(command: str, config_argv: list[str]) -> None:
    from ext.config_keys import config_file_of

    if not config_file_of(config_argv):
        raise ConfigError(f"{command} needs --job.config_file X.toml (without one it would show torchtitan's "
                          "defaults, not a config of yours)")


def _lr_schedule(args: argparse.Namespace, config_argv: list[str]) -> int:
    from ext.training.scheduler import resolve_schedule

    _needs_config("lr-schedule", config_argv)
    cfg = load_job_config(config_argv)
    steps = cfg.training.steps
    schedule = resolve_schedule(cfg.lr_scheduler, steps, cfg.optimizer.lr)
    factors = [schedule.factor(s) for s in range(1, steps + 1)]
    marks = key_steps(factors)
    length = "" if schedule.total_steps == steps else f" (schedule length {schedule.total_steps})"
    print(f"LR schedule {schedule.description}")
    print(f"optimizer.lr {schedule.peak_lr:.4g}, training.steps {steps}{length}")
    print(f"{'step':>8}  {'lr':>11}  {'x lr':>7}")
    for s in schedule_rows(marks, steps, args.rows):
        note = f"  {marks[s]}" if s in marks else ""
        print(f"{s:>8}  {schedule.peak_lr * factors[s - 1]:>11.4e}  {factors[s - 1]:>7.4f}{note}")
    if args.plot:
        lrs = [schedule.peak_lr * f for f in factors]
        print(_plot(args.plot, list(range(1, steps + 1)), lrs, schedule.description, marks))
    return 0


register(Command(
    name="lr-schedule",
    help="print (and plot) the LR schedule of a config",
    add_arguments=_lr_schedule_arguments,
    run=_lr_schedule,
    config_args=True,
))


# ------------------------------------------------------------------------ flops


def _flops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--packed", choices=("auto", "data", "synthetic"), default="auto",
                        help="typical packed batch from the config's [data] sources or from synthetic "
                             "web-like documents (auto: data when [data] datasets is set)")
    parser.add_argument("--rows", type=int, default=64, help="rows read from [data] (default 64)")
    parser.add_argument("--docs", type=int, default=10000, help="synthetic documents (default 10000)")


def _flops(args: argparse.Namespace, config_argv: list[str]) -> int:
    import json

    from ext.training.flops import flops_report

    _needs_config("flops", config_argv)
    r = flops_report(load_job_config(config_argv), args.packed, docs=args.docs, rows=args.rows)
    if r["packed_note"]:
        print(f"note: {r['packed_note']}", file=sys.stderr)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']}, seq_len {r['seq_len']}: training FLOPs (forward + backward)")
    print(f"{'':34}{'ours':>14}{'torchtitan':>14}")
    print(f"{'params, total':34}{r['params_total']:>14,}{r['torchtitan_params']:>14,}")
    print(f"{'params, active per token':34}{r['params_active']:>14,}")
    print(f"{'params, embedding':34}{r['params_embedding']:>14,}")
    tt = r["torchtitan_flops_per_token"]
    print(f"{'FLOPs/token, full causal rows':34}{r['flops_per_token_causal']:>14.4e}{tt:>14.4e}"
          f"  (+{100 * r['torchtitan_overcount_causal']:.1f}%)")
    over = r["torchtitan_overcount_packed"]
    print(f"{'FLOPs/token, packed batch':34}{r['flops_per_token_packed']:>14.4e}{tt:>14.4e}"
          + (f"  (+{100 * over:.1f}% per step)" if over is not None else ""))
    print(f"{'FLOPs/token, PaLM convention':34}{r['flops_per_token_palm']:>14.4e}"
          f"  (mfu_palm = mfu_exact x {r['mfu_palm_over_mfu_exact_causal']:.3f} causal, "
          f"x {r['mfu_palm_over_mfu_exact_packed'] or float('nan'):.3f} packed)")
    print(f"packed batch: {r['packed_rows']} rows ({r['packed_source']}), attention "
          f"{'within documents' if r['packed_attention'] == 'documents' else 'causal over the row'}, "
          f"{100 * r['packed_real_fraction']:.2f}% of tokens not padding, "
          f"{100 * r['packed_trained_fraction']:.2f}% trained, "
          f"{r['packed_pairs_per_token']:.1f} keys per query")
    if r["params_of_built_model"] != r["params_total"]:
        print(f"warning: the built model has {r['params_of_built_model']:,} parameters", file=sys.stderr)
    return 0


register(Command(
    name="flops",
    help="parameters and training FLOPs per token of a config (ours and torchtitan's)",
    add_arguments=_flops_arguments,
    run=_flops,
    config_args=True,
))


# -------------------------------------------------------------------- dcp-to-hf


def _dcp_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    from ext.export import add_arguments

    add_arguments(parser)


def _dcp_to_hf(args: argparse.Namespace, config_argv: list[str]) -> int:
    from ext.export import run

    # No config option: the model is identified from the checkpoint's tensors.
    return run(args, load_job_config(config_argv) if config_argv else None)


register(Command(
    name="dcp-to-hf",
    help="convert a DCP checkpoint to a Hugging Face folder (safetensors, config, tokenizer)",
    add_arguments=_dcp_to_hf_arguments,
    run=_dcp_to_hf,
    config_args=True,
))


# ------------------------------------------------------------------------ check


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job.config_file", "--job.config-file", dest="config_file", required=True,
                        help="TOML config to check")


def _check(args: argparse.Namespace, config_argv: list[str]) -> int:
    from ext.preflight import check

    cfg = load_job_config(["--job.config_file", args.config_file, *config_argv])
    problems = check(cfg)
    try:
        from ext.training.memory import estimate
        from ext.preflight import Launch

        launch = Launch.from_env()
        memory = estimate(cfg, launch.world_size, launch.local_world_size, launch.cuda)
        if memory is not None:
            print(memory.line())
        from ext.training.memory import launch_notes

        for note in launch_notes(cfg, launch.world_size, launch.local_world_size, launch.cuda):
            print(note, file=sys.stderr)
        from ext.training.eval import eval_read_note

        others = cfg.parallelism.tensor_parallel_degree * cfg.parallelism.pipeline_parallel_degree \
            * cfg.parallelism.context_parallel_degree
        note = eval_read_note(cfg, max(launch.world_size // max(others, 1), 1))
        if note:
            print(note, file=sys.stderr)
    except Exception:  # the memory_fits check has reported why
        pass
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.config_file}; nothing was started", file=sys.stderr)
        return 2
    print(f"{args.config_file}: ok")
    return 0


register(Command(
    name="check",
    help="check a training config (sources, assets, sizes, layout, attention, schedule) without training",
    add_arguments=_check_arguments,
    run=_check,
    config_args=True,
))


# ---------------------------------------------------------------------- reshard


def _reshard_arguments(parser: argparse.ArgumentParser) -> None:
    from ext.data.reshard import add_arguments

    add_arguments(parser)


def _reshard(args: argparse.Namespace, config_argv: list[str]) -> int:
    from ext.data.reshard import run

    return run(args)


register(Command(
    name="reshard",
    help="rewrite a data source (file, folder or Hub id) into N parquet shards; see ext.data.reshard",
    add_arguments=_reshard_arguments,
    run=_reshard,
))


# --------------------------------------------------------------------- tokenize


def _tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="data file, folder or glob (.jsonl, .txt, each also .gz/.zst, .parquet)")
    parser.add_argument("--out", required=True, metavar="DIR", help="token folder to write (new or empty)")
    parser.add_argument("--job.config_file", "--job.config-file", dest="config_file", required=True,
                        help="TOML config: tokenizer ([model] hf_assets_path), [data] add_bos/add_eos, "
                             "text_fields, bad_records")
    parser.add_argument("--workers", type=int, default=max(len(os.sched_getaffinity(0)), 1),
                        help="tokenizing processes (default: the CPU cores)")
    parser.add_argument("--text-field", default=None,
                        help="record field holding the text (default: [data] text_fields, one entry)")
    parser.add_argument("--chunk-mb", type=float, default=64,
                        help="input MiB per output shard (uncompressed files and parquet are cut; default 64)")


def _tokenize(args: argparse.Namespace, config_argv: list[str]) -> int:
    """``tokenize``: a source -> a token folder (see :mod:`ext.data.tokenized`)."""
    from ext.data.tokenized import summary_line, tokenize_source
    from ext.core.errors import DataError, one_line

    cfg = load_job_config(["--job.config_file", args.config_file, *config_argv])
    if getattr(cfg, "sft", None) is not None and cfg.sft.enable:
        raise ConfigError("[sft] enable = true: tokenize writes plain-text documents, not chat samples; "
                          "set [sft] enable = false to tokenize text")
    assets = cfg.model.hf_assets_path
    if not os.path.isfile(os.path.join(assets, "tokenizer.json")):
        raise ConfigError(f"[model] hf_assets_path {assets!r} has no tokenizer.json; point it at the tokenizer")
    fields = list(cfg.data.text_fields)
    if args.text_field is None and len(fields) != 1:
        raise ConfigError(f"[data] text_fields has {len(fields)} entries; say which with --text-field")
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from tqdm import tqdm

    tok = HuggingFaceTokenizer(assets)
    bar = tqdm(total=0, unit="B", unit_scale=True, desc="tokenize", disable=None, file=sys.stderr)

    def progress(done: int, total: int, tokens: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)

    try:
        info = tokenize_source(
            args.source, args.out, tok.tokenizer, tokenizer_name=assets,
            bos_id=tok.bos_id if cfg.data.add_bos else None, eos_id=tok.eos_id if cfg.data.add_eos else None,
            text_field=args.text_field or fields[0], bad_records=cfg.data.bad_records,
            workers=args.workers, chunk_bytes=max(int(args.chunk_mb * 2**20), 1), progress=progress,
        )
    except DataError as exc:
        bar.close()
        print(f"error: {one_line(exc)} (nothing was written to {args.out})", file=sys.stderr)
        return 2
    bar.close()
    print(summary_line(info, args.out))
    return 0


register(Command(
    name="tokenize",
    help="write a source as pre-tokenized shards (datatrove .ds layout) that [data] datasets can read",
    add_arguments=_tokenize_arguments,
    run=_tokenize,
    config_args=True,
))


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ext.cli", description="torchtitan-ext tools", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        epilog = "Other --section.key options are trainer config arguments." if command.config_args else None
        command.add_arguments(sub.add_parser(
            command.name, help=command.help, description=command.help, epilog=epilog,
            allow_abbrev=False,
        ))
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    command = COMMANDS[args.command]
    from ext.core.logs import quiet_known_noise

    quiet_known_noise()  # e.g. torchtitan's unprefixed "Warmup steps (N) exceed total steps" from the check
    if rest and not command.config_args:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return command.run(args, rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["check"]:
        # check writes nothing and starts nothing: skip the interpreter's teardown
        # of torch (1.5-2 s), paid before every launch since run_train.sh runs it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
