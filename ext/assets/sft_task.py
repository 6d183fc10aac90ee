"""A small, learnable chat task for SFT runs on CPU: train and held-out splits.

Four kinds of question, each with one exact answer, in several phrasings:
repeat a word, parity of a number, one-digit addition, the larger of two
numbers. Everything is generated here (seeded), so the files are
license-clean and byte-identical on every run::

    python -m ext.assets.sft_task            # writes ext/assets/data/sft_{train,heldout}.jsonl

The held-out split holds questions whose (kind, operands) never occur in the
train split, so exact match there measures generalization, not recall.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud garden window candle forest silver rocket pencil basket "
    "mirror island ladder bridge engine meadow castle lantern harbor jacket orange "
    "pepper tunnel violin wagon yellow zebra anchor butter copper desert feather "
    "glacier hammer jungle kettle lemon marble needle ocean paddle quartz saddle "
    "thunder velvet walnut cactus dolphin falcon ginger hollow igloo jigsaw kernel"
).split()
SYSTEM = "You are a precise assistant. Answer in one short sentence."


def _questions(rng: random.Random) -> list[tuple[str, tuple, str, str]]:
    """Every (kind, key, question, answer), keys unique per kind."""
    out = []
    for w in WORDS:
        for q in (f"Repeat the word {w}.", f"Say {w} back to me."):
            out.append(("repeat", (w, q[:3]), q, w))
    for n in range(10, 400):
        q = rng.choice((f"Is {n} even or odd?", f"Is the number {n} odd or even?"))
        out.append(("parity", (n,), q, f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    for a in range(10):
        for b in range(10):
            q = rng.choice((f"What is {a} + {b}?", f"Add {a} and {b}."))
            out.append(("add", (a, b), q, f"{a} + {b} = {a + b}."))
    for _ in range(400):
        a, b = rng.sample(range(10, 100), 2)
        q = f"Which is larger, {a} or {b}?"
        out.append(("larger", (a, b), q, f"{max(a, b)} is larger."))
    return out


def conversations(seed: int = 0, heldout_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, heldout) records in the ``messages`` schema."""
    rng = random.Random(seed)
    items = _questions(rng)
    seen, unique = set(), []
    for kind, key, q, a in items:
        if (kind, key) not in seen:
            seen.add((kind, key))
            unique.append((q, a))
    rng.shuffle(unique)
    n_heldout = int(len(unique) * heldout_fraction)

    def record(pairs: list[tuple[str, str]]) -> dict:
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
        for q, a in pairs:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": messages}

    heldout = [record([p]) for p in unique[:n_heldout]]
    train_pairs = unique[n_heldout:]
    train = []
    for _ in range(3):  # three passes with different groupings into 1-3 turn chats
        rng.shuffle(train_pairs)
        i = 0
        while i < len(train_pairs):
            k = rng.randint(1, 3)
            train.append(record(train_pairs[i : i + k]))
            i += k
    return train, heldout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = parser.parse_args(argv)
    train, heldout = conversations()
    for name, records in (("sft_train", train), ("sft_heldout", heldout)):
        path = Path(args.out) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        print(f"{path}: {len(records)} conversations")


if __name__ == "__main__":
    main()
