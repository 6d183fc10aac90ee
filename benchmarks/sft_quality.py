"""Does SFT teach the shipped chat task? Held-out loss and exact match, before and after.

Runs ``train_configs/debug_sft.toml`` on CPU through ``run_train.sh`` from a
seed checkpoint (so "before" and "after" share the initial weights), then
loads both checkpoints (torch DCP) into our model and measures, on
``ext/assets/data/sft_heldout.jsonl`` (questions never seen in training):

- ``heldout_loss``: mean cross-entropy over assistant tokens (incl. ``<|im_end|>``);
- ``exact_match``: greedy answer (until ``<|im_end|>``, at most 32 tokens)
  equal to the reference answer.

Targets: loss down by at least 30%, exact match up by at least 0.2. The last
line printed is one JSON object.

    python benchmarks/sft_quality.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ext.data.chat import ChatEncoder  # noqa: E402
from ext.data.encoders import load_chat_tokenizer  # noqa: E402
from ext.model.llama3 import SegmentLlama3, llama3_flavors  # noqa: E402

CONFIG = REPO / "train_configs" / "debug_sft.toml"
HELDOUT = REPO / "ext" / "assets" / "data" / "sft_heldout.jsonl"
TOKENIZER = REPO / "ext" / "assets" / "tokenizer"


def train(args: list[str]) -> None:
    env = {**os.environ, "EXT_SKIP_SETUP": os.environ.get("EXT_SKIP_SETUP", "1")}
    proc = subprocess.run([str(REPO / "run_train.sh"), "--job.config_file", str(CONFIG), *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def load_model(checkpoint: Path) -> SegmentLlama3:
    args = llama3_flavors()["tiny"]
    args.max_seq_len = 256
    args.mask_backend = "dense"
    model = SegmentLlama3(args)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def evaluate(model: SegmentLlama3, tok, conversations: list[list[dict]]) -> dict[str, float]:
    encoder = ChatEncoder(tok)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    losses, tokens, exact = 0.0, 0, 0
    for messages in conversations:
        enc = encoder.encode(messages)
        ids = torch.from_numpy(enc.ids).long()[None]
        logits = model(ids[:, :-1], segment_ids=torch.zeros_like(ids[:, :-1]))
        target = torch.where(torch.from_numpy(enc.trained[1:])[None], ids[:, 1:], -100)
        losses += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum").item()
        tokens += int((target != -100).sum())
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        out = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"])[None]
        answer = []
        for _ in range(32):
            nxt = int(model(out, segment_ids=torch.zeros_like(out))[0, -1].argmax())
            if nxt == end_id:
                break
            answer.append(nxt)
            out = torch.cat([out, torch.tensor([[nxt]])], dim=1)
        exact += tok.decode(answer) == messages[-1]["content"]
    return {"heldout_loss": losses / tokens, "exact_match": exact / len(conversations)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    tok = load_chat_tokenizer(str(TOKENIZER))
    heldout = [json.loads(line)["messages"] for line in HELDOUT.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        seed, run = Path(tmp) / "seed", Path(tmp) / "run"
        train(["--job.dump_folder", str(seed), "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
               "--training.steps", "1", "--parallelism.data_parallel_shard_degree", "1"])
        seed_ckpt = seed / "checkpoint" / "step-0"
        train(["--job.dump_folder", str(run), "--training.steps", str(args.steps),
               "--checkpoint.enable", "--checkpoint.interval", str(args.steps),
               "--checkpoint.initial_load_path", str(seed_ckpt)])
        before = evaluate(load_model(seed_ckpt), tok, heldout)
        after = evaluate(load_model(run / "checkpoint" / f"step-{args.steps}"), tok, heldout)
    result = {"before": before, "after": after, "steps": args.steps, "heldout_conversations": len(heldout)}
    print(f"held-out loss {before['heldout_loss']:.3f} -> {after['heldout_loss']:.3f}; "
          f"exact match {before['exact_match']:.2f} -> {after['exact_match']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
