"""What evaluation costs: the holdout check on the training reader, held-out eval, verifiers.

Three figures, each best of ``--repeats`` (the machine may be shared):

- ``reader``: documents per second through one training reader (read jsonl,
  tokenize, pack; ``num_workers = 0``) with no holdout and with a 5% hash
  holdout carved out (one BLAKE2b per record read; the two alternate);
  ``holdout_overhead`` is the relative slowdown, and ``hash_us_per_record``
  the hash alone (the robust figure on a busy machine).
- ``heldout``: the held-out evaluation of ``train_configs/debug_eval.toml``'s
  three sources (5% each) on the ``tiny`` model in this process (CPU, fp32):
  the first evaluation (read, tokenize, pack, forward) and a later one
  (cached rows, forward only), with evaluated tokens per second.
- ``verifiers`` (only when the optional ``verifiers`` package is installed):
  one evaluation of a 4-task echo environment (``tests/verifiers_echo.py``)
  through the loopback endpoint, ``--max-tokens`` tokens per answer, with
  generated tokens per second (whole-sequence recompute per token, no KV
  cache).

The last line printed is one JSON object.

    python benchmarks/eval.py [--copies 10] [--repeats 3] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # the shipped configs use paths relative to the repository root

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import ext.job_config  # noqa: E402,F401
from ext.data.config import Data  # noqa: E402
from ext.data.dataset import PackedMixtureDataset  # noqa: E402
from ext.data.encoders import TextEncoder  # noqa: E402
from ext.data.holdout import in_holdout, plan_holdout  # noqa: E402
from ext.training.eval import Eval, HeldOutValidator, undisturbed  # noqa: E402

CORPUS = REPO / "ext" / "assets" / "data" / "web.jsonl"
TOKENIZER = REPO / "ext" / "assets" / "tokenizer"
CONFIG = REPO / "train_configs" / "debug_eval.toml"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reader_figures(copies: int, repeats: int) -> dict:
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    lines = CORPUS.read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "web.jsonl"
        path.write_text("".join(
            json.dumps({"text": f"{k} " + json.loads(line)["text"]}) + "\n" for k in range(copies) for line in lines
        ))
        n = copies * len(lines)
        data = Data(datasets=[str(path)], on_exhaustion=["drop"])
        runs = {}
        for label, fraction in (("no_holdout", 0.0), ("holdout_5pct", 0.05)):
            spec = plan_holdout(data, Eval(holdout_fraction=[fraction])).train[0]

            def one_epoch(spec=spec) -> None:
                for _ in PackedMixtureDataset([spec], data, TextEncoder(tok, bos, eos), 2, 2048, 0, 1, 0):
                    pass

            runs[label] = one_epoch
        seconds = {label: float("inf") for label in runs}
        for _ in range(repeats):  # alternate, so drifting machine load hits both alike
            for label, fn in runs.items():
                seconds[label] = min(seconds[label], best(fn, 1))
        texts = [json.loads(line)["text"] for line in lines] * copies
        hash_s = best(lambda: [in_holdout(t, 0.05) for t in texts], repeats)
    out = {"documents": n, **{f"{label}_docs_per_s": n / s for label, s in seconds.items()},
           "hash_us_per_record": 1e6 * hash_s / n}
    out["holdout_overhead"] = seconds["holdout_5pct"] / seconds["no_holdout"] - 1
    out["hash_share_of_reading"] = hash_s / seconds["no_holdout"]
    return out


def validator(extra: list[str]) -> HeldOutValidator:
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.tokenizer import build_hf_tokenizer
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    cfg = ConfigManager().parse_args(["--job.config_file", str(CONFIG), *extra])
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    return HeldOutValidator(
        job_config=cfg, dp_world_size=1, dp_rank=0, tokenizer=build_hf_tokenizer(cfg), parallel_dims=dims,
        loss_fn=build_cross_entropy_loss(cfg), validation_context=dist_utils.get_train_context(False),
        maybe_enable_amp=dist_utils.maybe_enable_amp(dims, "float32", "cpu"), metrics_processor=None,
    )


def tiny_model():
    from ext.model.llama3 import SegmentLlama3, llama3_flavors

    args = llama3_flavors()["tiny"]
    args.max_seq_len, args.mask_backend = 256, "dense"
    torch.manual_seed(0)
    model = SegmentLlama3(args)
    with torch.no_grad():
        model.init_weights()
    return model


def heldout_figures(repeats: int) -> dict:
    model = tiny_model()
    first = None
    for _ in range(repeats):  # a fresh validator each time: read, tokenize and pack again
        v = validator([])
        start = time.perf_counter()
        with undisturbed([model]):
            metrics, _ = v.heldout_metrics([model])
        elapsed = time.perf_counter() - start
        first = elapsed if first is None else min(first, elapsed)

    def again() -> None:
        with undisturbed([model]):
            v.heldout_metrics([model])

    cached = best(again, repeats)
    rows = sum(len(b) for _, b in v._batches) * v.job_config.validation.local_batch_size
    return {
        "sources": [name for name, _ in v._batches],
        "evaluated_tokens": metrics["eval/tokens"],
        "row_tokens": rows * v.job_config.training.seq_len,
        "first_eval_s": first,
        "later_eval_s": cached,
        "later_eval_row_tokens_per_s": rows * v.job_config.training.seq_len / cached,
    }


def verifiers_figures(repeats: int, max_tokens: int) -> dict | None:
    if importlib.util.find_spec("verifiers") is None:
        return None
    sys.modules["verifiers_echo"] = importlib.import_module("tests.verifiers_echo")
    v = validator(["--eval.verifiers_envs", "verifiers_echo", "--eval.verifiers_max_tokens", str(max_tokens)])
    model = tiny_model()
    generated = []
    original = v._verifiers.generator.generate

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        generated.extend(len(c.token_ids) for c in out)
        return out

    v._verifiers.generator.generate = counting

    def once() -> None:
        generated.clear()
        with undisturbed([model]):
            v._verifiers.run([model], step=1)

    seconds = best(once, repeats)
    return {"tasks": 4, "max_tokens": max_tokens, "eval_s": seconds,
            "generated_tokens": sum(generated), "generated_tokens_per_s": sum(generated) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="copies of the web corpus for the reader figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"reader": reader_figures(args.copies, args.repeats), "heldout": heldout_figures(args.repeats),
              "verifiers": verifiers_figures(args.repeats, args.max_tokens), "threads": torch.get_num_threads()}
    r, h = result["reader"], result["heldout"]
    print(f"reader: {r['no_holdout_docs_per_s']:,.0f} docs/s, with a 5% holdout {r['holdout_5pct_docs_per_s']:,.0f} "
          f"({100 * r['holdout_overhead']:+.1f}%); the hash alone {r['hash_us_per_record']:.1f} us per record "
          f"({100 * r['hash_share_of_reading']:.2f}% of reading)")
    print(f"held-out eval ({', '.join(h['sources'])}; {h['evaluated_tokens']:,.0f} tokens): first "
          f"{h['first_eval_s']:.2f} s, later {h['later_eval_s']:.2f} s ({h['later_eval_row_tokens_per_s']:,.0f} row tokens/s)")
    if result["verifiers"]:
        vf = result["verifiers"]
        print(f"verifiers echo env: {vf['eval_s']:.2f} s, {vf['generated_tokens_per_s']:,.1f} generated tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
