"""Regenerate the synthetic corpora and the byte-level BPE tokenizer in ``ext/assets``.

Run ``python -m ext.assets.build`` from the repository root. Every byte of the
output is a function of the code below: all text comes from the word lists,
grammar templates and seeded random choices in this module (no downloaded or
copied data), JSON is written with sorted keys, and nothing depends on time,
hash seeds or the machine, so two runs produce identical files.

Document lengths are measured in tokens. A pilot tokenizer is trained on a
first draft of the corpora whose lengths are estimated from character counts;
the final corpora are then generated to token-length targets measured with
the pilot tokenizer, and the shipped tokenizer is trained on those final
corpora. The reported statistics are measured with the shipped tokenizer.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 2024
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
BOS, EOS, PAD, IM_START, IM_END = SPECIAL_TOKENS
MODEL_MAX_LENGTH = 8192
MAX_CORPUS_BYTES = 6_000_000

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATE_NO_GENERATION = CHAT_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", ""
)

CountFn = Callable[[str], int]
Message = dict[str, str]
Conversation = list[Message]


# --------------------------------------------------------------------------- #
# Lengths
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LengthSpec:
    """Clipped lognormal distribution of document lengths in tokens."""

    median: float
    sigma: float
    minimum: int
    maximum: int

    def sample(self, rng: random.Random) -> int:
        """Draw one target length."""
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return min(self.maximum, max(self.minimum, round(value)))


@dataclass(frozen=True)
class TextCorpusSpec:
    """Name, document count and length distribution of a plain-text corpus."""

    name: str
    documents: int
    lengths: LengthSpec


# Document counts keep all corpora together under MAX_CORPUS_BYTES: a web
# document averages about 290 tokens of about 4.4 bytes each.
WEB = TextCorpusSpec("web", 3000, LengthSpec(180, 1.0, 8, 6000))
CODE = TextCorpusSpec("code", 1000, LengthSpec(150, 0.8, 16, 3000))
MATH = TextCorpusSpec("math", 1000, LengthSpec(120, 0.7, 24, 2000))
CHAT_CONVERSATIONS = 600
SHAREGPT_CONVERSATIONS = 100
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
ASSET_FILES = {
    "data/web.jsonl": 'English-like prose from a probabilistic grammar (`{"text": ...}`)',
    "data/code.jsonl": 'Python modules from function and class templates (`{"text": ...}`)',
    "data/math.jsonl": 'arithmetic word problems with worked, checked solutions (`{"text": ...}`)',
    "data/chat.jsonl": "conversations in the OpenAI `messages` schema (system/user/assistant)",
    "data/chat_sharegpt.jsonl": (
        "conversations in the ShareGPT `conversations` schema (system/human/gpt)"),
    "tokenizer/tokenizer.json": f"byte-level BPE, {VOCAB_SIZE} tokens, special tokens at ids 0-4",
    "tokenizer/tokenizer_config.json": (
        "BOS/EOS/PAD, no automatic BOS/EOS, ChatML chat template with `{% generation %}` tags"),
    "tokenizer/chat_template_no_generation.jinja": (
        "the same ChatML template without generation tags"),
}


def fill(target: int, count: CountFn, pieces: Iterator[str]) -> str:
    """Concatenate pieces until their token count is as close as possible to ``target``.

    A piece is kept when the total after it is at least as close to the target
    as the total before it; the first piece is always kept. Pieces start at a
    pre-tokenizer boundary (a space or newline before a word), so their token
    counts add up to the count of the joined text.
    """
    parts: list[str] = []
    total = 0
    while total < target:
        piece = next(pieces)
        size = count(piece)
        if parts and total + size - target > target - total:
            break
        parts.append(piece)
        total += size
    return "".join(parts)


def approximate_token_count(text: str) -> int:
    """Token count estimate used before any tokenizer exists (about 4 characters a token)."""
    return max(1, len(text) // 4)


# --------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Topic:
    """Words that recur in documents about one subject."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(("garden", "flower", "seed", "tree", "leaf", "soil", "rose", "bee"),
          ("green", "wild", "fresh", "tall"), ("plant", "water", "grow", "pick")),
    Topic(("kitchen", "bread", "soup", "oven", "recipe", "knife", "onion", "cake"),
          ("warm", "sweet", "salty", "hot"), ("bake", "cook", "slice", "taste")),
    Topic(("river", "boat", "bridge", "fish", "bank", "stone", "current", "island"),
          ("cold", "deep", "quiet", "wide"), ("cross", "follow", "catch", "paint")),
    Topic(("city", "street", "bus", "tower", "market", "square", "shop", "crowd"),
          ("busy", "loud", "old", "bright"), ("visit", "build", "clean", "open")),
    Topic(("song", "piano", "guitar", "band", "drum", "concert", "voice", "note"),
          ("soft", "happy", "slow", "loud"), ("play", "sing", "write", "hear")),
    Topic(("school", "teacher", "student", "lesson", "book", "desk", "test", "class"),
          ("new", "hard", "simple", "long"), ("read", "teach", "learn", "study")),
    Topic(("rain", "wind", "cloud", "storm", "sun", "snow", "sky", "season"),
          ("dark", "cold", "dry", "strong"), ("watch", "expect", "feel", "measure")),
    Topic(("forest", "path", "fox", "owl", "branch", "trail", "camp", "deer"),
          ("dense", "silent", "ancient", "green"), ("explore", "find", "follow", "climb")),
    Topic(("ocean", "wave", "ship", "shell", "beach", "whale", "harbor", "tide"),
          ("blue", "calm", "rough", "salty"), ("sail", "reach", "watch", "cross")),
    Topic(("library", "page", "story", "author", "shelf", "letter", "map", "poem"),
          ("rare", "famous", "short", "quiet"), ("borrow", "read", "write", "sort")),
    Topic(("farm", "cow", "horse", "field", "barn", "apple", "tractor", "goat"),
          ("early", "muddy", "large", "ripe"), ("feed", "harvest", "carry", "sell")),
    Topic(("mountain", "peak", "valley", "rock", "rope", "cliff", "lake", "hiker"),
          ("steep", "high", "rocky", "cold"), ("climb", "cross", "reach", "see")),
    Topic(("workshop", "hammer", "table", "chair", "nail", "plank", "tool", "box"),
          ("heavy", "sharp", "solid", "rough"), ("fix", "cut", "build", "paint")),
    Topic(("doctor", "patient", "nurse", "clinic", "medicine", "bed", "heart", "meal"),
          ("healthy", "tired", "careful", "calm"), ("help", "treat", "check", "visit")),
    Topic(("team", "ball", "coach", "game", "player", "goal", "stadium", "match"),
          ("fast", "strong", "young", "proud"), ("kick", "win", "train", "lose")),
    Topic(("computer", "screen", "program", "file", "network", "keyboard", "server", "user"),
          ("fast", "digital", "simple", "new"), ("install", "save", "update", "test")),
)
GENERAL_NOUNS = (
    "day", "year", "friend", "family", "house", "door", "window", "road", "car", "morning",
    "evening", "child", "person", "idea", "problem", "question", "plan", "picture", "village",
    "neighbor", "bag", "hour", "week", "place", "group", "way", "bottle", "lamp", "garden",
    "story", "game", "machine", "box", "letter",
)
GENERAL_ADJECTIVES = (
    "good", "small", "big", "little", "beautiful", "important", "common", "useful", "strange",
    "modern", "local", "clear", "perfect", "light", "open", "empty", "full", "red", "white",
    "black", "yellow", "great", "nice", "different", "special", "simple", "old",
)
GENERAL_VERBS = (
    "like", "need", "want", "describe", "share", "bring", "make", "take", "carry", "move",
    "keep", "choose", "use", "show", "prepare", "improve", "remember", "notice", "protect",
    "leave", "buy", "draw", "collect", "count", "discover", "enjoy", "know", "love", "meet",
    "open", "close", "check", "hold", "give",
)
FREQUENCY_ADVERBS = ("often", "always", "usually", "sometimes", "rarely", "never", "also")
MANNER_ADVERBS = ("quickly", "slowly", "carefully", "quietly", "happily", "together", "again")
PREPOSITIONS = ("in", "near", "behind", "under", "with", "across", "around", "from", "into",
                "next to", "after", "before", "for", "without")
CONNECTIVES = ("However,", "Then", "Later,", "In fact,", "For example,", "As a result,",
               "Meanwhile,", "Still,", "Of course,", "Sometimes", "Finally,", "Also,")
PRESENT_TIMES = ("Every morning", "In the evening", "On weekends", "Today", "Most days",
                 "During the summer", "At night", "In winter", "Every year")
PAST_TIMES = ("Last week", "Yesterday", "Years ago", "Last summer", "That morning",
              "After lunch", "One day", "Long ago", "During the summer")
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack",
         "Kate", "Leo", "Maya", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
         "Wendy", "Yusuf", "Zoe", "Omar", "Lina", "Marco", "Nina", "Ravi", "Sofia", "Tom")
PRONOUNS = ("we", "they", "you")
SINGULAR_DETERMINERS = ("the", "the", "the", "a", "a", "this", "our", "my", "every", "that")
PLURAL_DETERMINERS = ("the", "the", "some", "many", "these", "our", "their", "two", "several", "")
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
TITLE_SMALL_WORDS = {"a", "an", "the", "of", "on", "in", "at", "to", "for", "and", "with"}

IRREGULAR_PLURALS = {
    "child": "children", "person": "people", "leaf": "leaves", "knife": "knives",
    "shelf": "shelves", "fish": "fish", "deer": "deer", "man": "men", "woman": "women",
}
IRREGULAR_PAST = {
    "grow": "grew", "write": "wrote", "sing": "sang", "hear": "heard", "read": "read",
    "teach": "taught", "feel": "felt", "find": "found", "catch": "caught", "build": "built",
    "see": "saw", "win": "won", "lose": "lost", "cut": "cut", "make": "made", "take": "took",
    "bring": "brought", "buy": "bought", "keep": "kept", "leave": "left", "sell": "sold",
    "know": "knew", "meet": "met", "draw": "drew", "hold": "held", "give": "gave",
    "choose": "chose", "swim": "swam", "fix": "fixed",
}
VOWEL_SOUND_EXCEPTIONS = {"hour": True, "user": False, "useful": False, "unit": False}


def plural_of(noun: str) -> str:
    """English plural of a noun from the word lists."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    """Third person singular present form of a verb."""
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def past_of(verb: str) -> str:
    """Simple past form of a verb."""
    if verb in IRREGULAR_PAST:
        return IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def indefinite_article(word: str) -> str:
    """``a`` or ``an`` for the word that follows."""
    vowel = VOWEL_SOUND_EXCEPTIONS.get(word.split()[0], word[0] in "aeiou")
    return "an" if vowel else "a"


def capitalize(text: str) -> str:
    """Upper-case the first character only."""
    return text[:1].upper() + text[1:]


def title_case(text: str) -> str:
    """Capitalize every word of a title except short function words."""
    words = text.split()
    return " ".join(
        word if index and word in TITLE_SMALL_WORDS else capitalize(word)
        for index, word in enumerate(words)
    )


# --------------------------------------------------------------------------- #
# Web prose
# --------------------------------------------------------------------------- #


class ProseDocument:
    """One English-like document: a main topic, a tense and a recurring character."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.main, self.side = rng.sample(TOPICS, 2)
        self.side_share = 0.2 if rng.random() < 0.4 else 0.0
        self.focus = rng.sample(self.main.nouns, 3)
        self.past = rng.random() < 0.4
        self.hero = rng.choice(NAMES)

    def pieces(self) -> Iterator[str]:
        """Yield an optional title, then paragraphs of sentences, each with its separator."""
        rng = self.rng
        separator = ""
        if rng.random() < 0.6:
            yield self.title()
            separator = "\n\n"
        while True:
            if rng.random() < 0.08:
                yield separator + self.bullet_list()
            else:
                for index in range(rng.randint(2, 6)):
                    yield (separator if index == 0 else " ") + self.sentence(index > 0)
            separator = "\n\n"

    def noun(self) -> str:
        """A noun, biased towards the document's focus and topic words."""
        roll = self.rng.random()
        if roll < 0.25:
            return self.rng.choice(self.focus)
        if roll < 0.55:
            return self.rng.choice(self.main.nouns)
        if roll < 0.55 + self.side_share:
            return self.rng.choice(self.side.nouns)
        return self.rng.choice(GENERAL_NOUNS)

    def adjective(self) -> str:
        """An adjective, half of the time from the main topic."""
        pool = self.main.adjectives if self.rng.random() < 0.5 else GENERAL_ADJECTIVES
        return self.rng.choice(pool)

    def verb(self) -> str:
        """A transitive verb in its base form."""
        pool = self.main.verbs if self.rng.random() < 0.4 else GENERAL_VERBS
        return self.rng.choice(pool)

    def conjugate(self, verb: str, plural: bool) -> str:
        """Verb form agreeing with the subject number in the document's tense."""
        if self.past:
            return past_of(verb)
        return verb if plural else third_person(verb)

    def copula(self, plural: bool) -> str:
        """``is``/``are``/``was``/``were``."""
        if self.past:
            return "were" if plural else "was"
        return "are" if plural else "is"

    def auxiliary(self, plural: bool) -> str:
        """``do``/``does``/``did`` for questions and negations."""
        if self.past:
            return "did"
        return "do" if plural else "does"

    def number(self) -> str:
        """A quantity written as a word or in digits."""
        roll = self.rng.random()
        if roll < 0.3:
            return self.rng.choice(NUMBER_WORDS)
        if roll < 0.75:
            return str(self.rng.randint(2, 30))
        if roll < 0.93:
            return str(self.rng.randint(31, 999))
        return f"{self.rng.randint(1, 9)},{self.rng.randint(0, 999):03d}"

    def noun_phrase(self, plural: bool) -> str:
        """Determiner, optional adjective and a noun."""
        rng = self.rng
        noun = self.noun()
        head = plural_of(noun) if plural else noun
        if rng.random() < 0.3:
            head = f"{self.adjective()} {head}"
        determiner = rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)
        if determiner == "a":
            determiner = indefinite_article(head)
        return f"{determiner} {head}" if determiner else head

    def subject(self) -> tuple[str, bool]:
        """A subject and whether it takes plural agreement."""
        roll = self.rng.random()
        if roll < 0.2:
            return self.hero, False
        if roll < 0.28:
            return self.rng.choice(NAMES), False
        if roll < 0.34:
            return self.rng.choice(PRONOUNS), True
        plural = self.rng.random() < 0.35
        return self.noun_phrase(plural), plural

    def object(self) -> str:
        """A direct object."""
        if self.rng.random() < 0.08:
            return self.rng.choice(NAMES)
        return self.noun_phrase(self.rng.random() < 0.4)

    def modifier(self) -> str:
        """An optional prepositional phrase or manner adverb, with its leading space."""
        roll = self.rng.random()
        if roll < 0.3:
            return f" {self.rng.choice(PREPOSITIONS)} {self.noun_phrase(self.rng.random() < 0.3)}"
        if roll < 0.4:
            return f" {self.rng.choice(MANNER_ADVERBS)}"
        return ""

    def clause(self) -> str:
        """Subject, verb and object, sometimes negated or with an adverb."""
        rng = self.rng
        subject, plural = self.subject()
        verb = self.verb()
        roll = rng.random()
        if roll < 0.1:
            predicate = f"{self.auxiliary(plural)} not {verb}"
        elif roll < 0.25:
            predicate = f"{rng.choice(FREQUENCY_ADVERBS)} {self.conjugate(verb, plural)}"
        else:
            predicate = self.conjugate(verb, plural)
        return f"{subject} {predicate} {self.object()}{self.modifier()}"

    def sentence(self, allow_connective: bool) -> str:
        """One sentence drawn from a weighted set of templates."""
        rng = self.rng
        kind = rng.choices(
            ("plain", "time", "compound", "copula", "count", "year", "question", "quote",
             "list", "percent", "exclaim"),
            weights=(30, 10, 14, 10, 8, 3, 5, 4, 6, 3, 2),
        )[0]
        if kind == "plain":
            text = self.clause() + "."
        elif kind == "time":
            times = PAST_TIMES if self.past else PRESENT_TIMES
            return f"{rng.choice(times)}, {self.clause()}."
        elif kind == "compound":
            joiner = rng.choice((" and ", ", but ", " because ", ", so ", " while ", " after "))
            text = f"{self.clause()}{joiner}{self.clause()}."
        elif kind == "copula":
            subject, plural = self.subject()
            adjectives = self.adjective()
            if rng.random() < 0.4:
                adjectives += f" and {self.adjective()}"
            text = f"{subject} {self.copula(plural)} {adjectives}."
        elif kind == "count":
            subject, plural = self.subject()
            verb = self.conjugate(self.verb(), plural)
            text = f"{subject} {verb} {self.number()} {plural_of(self.noun())}{self.modifier()}."
        elif kind == "year":
            return f"In {rng.randint(1850, 2023)}, {self.clause()}."
        elif kind == "question":
            subject, plural = self.subject()
            question = f"Why {self.auxiliary(plural)} {subject} {self.verb()} {self.object()}?"
            return f"{question} {capitalize(self.clause())}."
        elif kind == "quote":
            return f'{rng.choice(NAMES)} said, "{capitalize(self.clause())}."'
        elif kind == "list":
            subject, plural = self.subject()
            items = [self.noun_phrase(rng.random() < 0.5) for _ in range(rng.randint(3, 4))]
            text = (f"{subject} {self.conjugate(self.verb(), plural)} "
                    f"{', '.join(items[:-1])}, and {items[-1]}.")
        elif kind == "percent":
            return (f"About {rng.randint(5, 95)} percent of the {plural_of(self.noun())} "
                    f"{self.conjugate(self.verb(), True)} {self.object()}.")
        else:
            phrase = f"{self.adjective()} {self.noun()}"
            return f"What {indefinite_article(phrase)} {phrase} it {self.copula(False)}!"
        if allow_connective and rng.random() < 0.15:
            return f"{rng.choice(CONNECTIVES)} {text}"
        return capitalize(text)

    def bullet_list(self) -> str:
        """A short heading followed by dash-prefixed items."""
        rng = self.rng
        heading = rng.choice(("Things to bring", "What we need", "Notes", "Key points",
                              f"Why the {self.noun()} matters"))
        items = [self.noun_phrase(rng.random() < 0.5) for _ in range(rng.randint(2, 5))]
        return heading + ":" + "".join(f"\n- {item}" for item in items)

    def title(self) -> str:
        """A title line for the document."""
        rng = self.rng
        noun = rng.choice(self.focus)
        options = (
            f"notes on the {noun}",
            f"how to {self.verb()} {indefinite_article(noun)} {noun}",
            f"the {self.adjective()} {noun}",
            f"why {plural_of(noun)} matter",
            f"a day at the {rng.choice(self.main.nouns)}",
            f"{self.hero} and the {noun}",
            f"{self.number()} facts about {plural_of(noun)}",
        )
        return title_case(rng.choice(options))


# --------------------------------------------------------------------------- #
# Python code
# --------------------------------------------------------------------------- #

CODE_NOUNS = ("item", "price", "score", "value", "weight", "order", "record", "point",
              "sample", "entry", "reading", "amount", "step", "level", "size", "length",
              "distance", "payment", "vote", "rating", "ticket", "task", "event", "row")
CODE_WORD_NOUNS = ("name", "word", "tag", "city", "color", "label", "user", "title", "line")
CODE_WORDS = ("red", "blue", "green", "apple", "river", "stone", "north", "south", "alpha",
              "beta", "cat", "dog", "tree", "moon")
MODULE_IMPORTS = ("import math", "import os", "import sys", "import json", "import random",
                  "from collections import Counter", "from pathlib import Path",
                  "from typing import List, Optional")
COMPARISONS = (">", "<", ">=", "<=")


class CodeDocument:
    """One Python module assembled from templated functions, classes and statements."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.calls: list[str] = []

    def pieces(self) -> Iterator[str]:
        """Yield an optional module header, then top-level blocks separated by blank lines."""
        rng = self.rng
        separator = ""
        if rng.random() < 0.6:
            yield self.header()
            separator = "\n\n\n"
        while True:
            yield separator + self.block()
            separator = "\n\n\n"

    def header(self) -> str:
        """Module docstring and imports."""
        rng = self.rng
        things = plural_of(rng.choice(CODE_NOUNS + CODE_WORD_NOUNS))
        docstring = rng.choice((f'"""Helpers for working with {things}."""',
                                f'"""Small utilities to process {things}."""',
                                f'"""Functions that clean and summarize {things}."""'))
        imports = sorted(rng.sample(MODULE_IMPORTS, rng.randint(1, 3)))
        return docstring + "\n\n" + "\n".join(imports)

    def numbers(self) -> str:
        """A literal list of small integers."""
        values = [str(self.rng.randint(0, 99)) for _ in range(self.rng.randint(3, 7))]
        return "[" + ", ".join(values) + "]"

    def words(self) -> str:
        """A literal list of short strings."""
        values = [f'"{self.rng.choice(CODE_WORDS)}"' for _ in range(self.rng.randint(3, 6))]
        return "[" + ", ".join(values) + "]"

    def comment(self, noun: str) -> str:
        """A short comment about the current variable."""
        return "# " + self.rng.choice((
            f"skip {plural_of(noun)} that are out of range",
            "start from an empty result",
            f"each {noun} is counted once",
            "keep the original order",
            f"TODO: handle missing {plural_of(noun)}",
            "this loop is small enough to stay simple",
            f"{plural_of(noun)} may contain duplicates",
            "return early when there is nothing to do",
        ))

    def block(self) -> str:
        """One top-level block chosen from the templates."""
        builders: list[Callable[[], str]] = [
            self.total_function, self.transform_function, self.count_function,
            self.largest_function, self.average_function, self.read_function,
            self.class_block, self.constant_block,
        ]
        weights = [12, 12, 8, 8, 8, 5, 6, 3]
        if self.calls:
            builders.append(self.usage_block)
            weights.append(8)
        return self.rng.choices(builders, weights=weights)[0]()

    def total_function(self) -> str:
        """Sum values that pass a comparison with a limit."""
        rng = self.rng
        noun = rng.choice(CODE_NOUNS)
        plural = plural_of(noun)
        name = f"{rng.choice(('total', 'sum', 'add_up'))}_{plural}"
        limit = rng.randint(10, 100)
        op = rng.choice(COMPARISONS)
        accumulator = rng.choice(("total", "result", "acc"))
        lines = [
            f"def {name}({plural}, limit={limit}):",
            f'    """Return the sum of {plural} that are not {op} limit."""',
            f"    {accumulator} = 0",
            f"    for {noun} in {plural}:",
        ]
        if rng.random() < 0.5:
            lines.append(f"        {self.comment(noun)}")
        lines += [
            f"        if {noun} {op} limit:",
            "            continue",
            f"        {accumulator} += {noun}",
            f"    return {accumulator}",
        ]
        self.calls.append(f"{name}({self.numbers()})")
        return "\n".join(lines)

    def transform_function(self) -> str:
        """A list comprehension that maps and optionally filters."""
        rng = self.rng
        noun = rng.choice(CODE_NOUNS)
        plural = plural_of(noun)
        verb, op = rng.choice((("scale", "*"), ("shift", "+"), ("reduce", "-"), ("split", "//")))
        factor = rng.randint(2, 9)
        name = f"{verb}_{plural}"
        condition = ""
        doc = f"{capitalize(verb)} every {noun} by factor."
        if rng.random() < 0.4:
            modulus = rng.randint(2, 5)
            condition = f" if {noun} % {modulus} == 0"
            doc = f"{capitalize(verb)} the {plural} divisible by {modulus}."
        lines = [
            f"def {name}({plural}, factor={factor}):",
            f'    """{doc}"""',
            f"    return [{noun} {op} factor for {noun} in {plural}{condition}]",
        ]
        self.calls.append(f"{name}({self.numbers()})")
        return "\n".join(lines)

    def count_function(self) -> str:
        """Count occurrences with a dictionary."""
        rng = self.rng
        noun = rng.choice(CODE_WORD_NOUNS)
        plural = plural_of(noun)
        name = f"count_{plural}"
        lines = [
            f"def {name}({plural}):",
            f'    """Count how often each {noun} appears."""',
            "    counts = {}",
            f"    for {noun} in {plural}:",
        ]
        if rng.random() < 0.5:
            lines += [f"        {noun} = {noun}.strip().lower()",
                      f"        if not {noun}:",
                      "            continue"]
        lines += [f"        counts[{noun}] = counts.get({noun}, 0) + 1", "    return counts"]
        self.calls.append(f"{name}({self.words()})")
        return "\n".join(lines)

    def largest_function(self) -> str:
        """Find an extreme value with an explicit while loop."""
        rng = self.rng
        noun = rng.choice(CODE_NOUNS)
        plural = plural_of(noun)
        kind, op = rng.choice((("largest", ">"), ("smallest", "<")))
        name = f"find_{kind}_{noun}"
        lines = [
            f"def {name}({plural}):",
            f'    """Return the {kind} {noun}, or None for an empty list."""',
            f"    if not {plural}:",
        ]
        if rng.random() < 0.5:
            lines.append(f"        {self.comment(noun)}")
        lines += [
            "        return None",
            f"    best = {plural}[0]",
            "    index = 1",
            f"    while index < len({plural}):",
            f"        if {plural}[index] {op} best:",
            f"            best = {plural}[index]",
            "        index += 1",
            "    return best",
        ]
        self.calls.append(f"{name}({self.numbers()})")
        return "\n".join(lines)

    def average_function(self) -> str:
        """Average of a list, with a guard for empty input."""
        rng = self.rng
        noun = rng.choice(CODE_NOUNS)
        plural = plural_of(noun)
        name = f"average_{noun}"
        digits = rng.randint(1, 3)
        lines = [
            f"def {name}({plural}):",
            f'    """Return the mean {noun} rounded to {digits} digits."""',
            f"    if len({plural}) == 0:",
            "        return 0.0",
            f"    return round(sum({plural}) / len({plural}), {digits})",
        ]
        self.calls.append(f"{name}({self.numbers()})")
        return "\n".join(lines)

    def read_function(self) -> str:
        """Read non-empty lines from a text file."""
        rng = self.rng
        noun = rng.choice(CODE_WORD_NOUNS)
        plural = plural_of(noun)
        lines = [
            f"def read_{plural}(path):",
            f'    """Read one {noun} per line from a text file."""',
            f"    {plural} = []",
            "    with open(path) as handle:",
            "        for line in handle:",
            "            line = line.strip()",
        ]
        if rng.random() < 0.5:
            lines += ['            if line.startswith("#"):', "                continue"]
        lines += ["            if line:", f"                {plural}.append(line)",
                  f"    return {plural}"]
        return "\n".join(lines)

    def class_block(self) -> str:
        """A small container class with a few methods."""
        rng = self.rng
        noun = rng.choice(CODE_NOUNS)
        plural = plural_of(noun)
        class_name = capitalize(noun) + rng.choice(("Store", "List", "Buffer", "Tracker"))
        lines = [
            f"class {class_name}:",
            f'    """Keep {plural} in memory."""',
            "",
            "    def __init__(self):",
            f"        self.{plural} = []",
            "",
            f"    def add(self, {noun}):",
            f"        self.{plural}.append({noun})",
        ]
        methods = {
            "size": ["    def size(self):", f"        return len(self.{plural})"],
            "total": ["    def total(self):", f"        return sum(self.{plural})"],
            "last": ["    def last(self):", f"        if not self.{plural}:",
                     "            return None", f"        return self.{plural}[-1]"],
            "clear": ["    def clear(self):", f"        self.{plural} = []"],
        }
        for method in rng.sample(sorted(methods), rng.randint(1, 3)):
            lines += [""] + methods[method]
        return "\n".join(lines)

    def constant_block(self) -> str:
        """One or two module-level constants."""
        rng = self.rng
        names = [f"{rng.choice(('MAX', 'MIN', 'DEFAULT'))}_{plural_of(noun).upper()}"
                 for noun in rng.sample(CODE_NOUNS, rng.randint(1, 2))]
        return "\n".join(f"{name} = {rng.randint(1, 500)}" for name in names)

    def usage_block(self) -> str:
        """Call functions defined earlier in the module and print the results."""
        rng = self.rng
        calls = rng.sample(self.calls, min(len(self.calls), rng.randint(1, 3)))
        lines = ['if __name__ == "__main__":'] if rng.random() < 0.3 else []
        indent = "    " if lines else ""
        lines += [f"{indent}print({call})" for call in calls]
        return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Math word problems
# --------------------------------------------------------------------------- #

ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "coins",
         "shells", "stamps", "flowers", "eggs", "candies", "balloons", "toys")
CONTAINERS = ("boxes", "bags", "baskets", "jars", "crates", "packs", "trays")
GAIN_VERBS = ("buys", "finds", "gets", "receives", "collects")
LOSS_VERBS = ("gives away", "eats", "loses", "sells", "uses")
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@dataclass(frozen=True)
class Problem:
    """A word problem, its worked solution and the final answer."""

    question: str
    steps: tuple[str, ...]
    answer: int


def equation(a: int, op: str, b: int) -> tuple[str, int]:
    """``"a op b = c"`` and c, for exact integer arithmetic."""
    if op == "+":
        result = a + b
    elif op == "-":
        result = a - b
    elif op == "*":
        result = a * b
    else:
        assert a % b == 0, (a, b)
        result = a // b
    return f"{a} {op} {b} = {result}", result


class MathDocument:
    """A worksheet of arithmetic word problems with worked solutions."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.labels = rng.choice((("Problem", "Solution"), ("Question", "Answer"), ("Q", "A")))

    def pieces(self) -> Iterator[str]:
        """Yield an optional worksheet heading, then problems separated by blank lines."""
        rng = self.rng
        separator = ""
        if rng.random() < 0.3:
            yield f"Worksheet {rng.randint(1, 40)}: word problems"
            separator = "\n\n"
        while True:
            yield separator + self.render(self.problem())
            separator = "\n\n"

    def render(self, problem: Problem) -> str:
        """Format a problem with the document's labels."""
        question_label, solution_label = self.labels
        solution = " ".join(problem.steps)
        return (f"{question_label}: {problem.question}\n{solution_label}: {solution} "
                f"The answer is {problem.answer}.")

    def problem(self) -> Problem:
        """One problem of a random kind."""
        builders = (self.gain_loss, self.groups, self.share, self.change, self.distance,
                    self.rectangle, self.average, self.reading, self.difference)
        return self.rng.choice(builders)()

    def gain_loss(self) -> Problem:
        """A running total changed by a few gains and losses."""
        rng = self.rng
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        count = rng.randint(5, 60)
        sentences = [f"{name} has {count} {item}."]
        steps = [f"{name} starts with {count} {item}."]
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5 or count < 2:
                amount = rng.randint(1, 40)
                sentences.append(f"Then {name} {rng.choice(GAIN_VERBS)} {amount} more.")
                text, count = equation(count, "+", amount)
            else:
                amount = rng.randint(1, count - 1)
                sentences.append(f"Then {name} {rng.choice(LOSS_VERBS)} {amount}.")
                text, count = equation(count, "-", amount)
            steps.append(f"Now there are {text} {item}.")
        sentences.append(f"How many {item} does {name} have now?")
        return Problem(" ".join(sentences), tuple(steps), count)

    def groups(self) -> Problem:
        """Equal groups: multiplication."""
        rng = self.rng
        groups, each = rng.randint(2, 12), rng.randint(2, 25)
        item, container = rng.choice(ITEMS), rng.choice(CONTAINERS)
        text, total = equation(groups, "*", each)
        return Problem(
            f"There are {groups} {container} with {each} {item} in each. "
            f"How many {item} are there in total?",
            (f"Multiply the number of {container} by the {item} in each: {text}.",),
            total,
        )

    def share(self) -> Problem:
        """Fair sharing: exact division."""
        rng = self.rng
        friends, each = rng.randint(2, 9), rng.randint(2, 20)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = friends * each
        text, result = equation(total, "/", friends)
        return Problem(
            f"{name} has {total} {item} and shares them equally among {friends} friends. "
            f"How many {item} does each friend get?",
            (f"Divide the {item} by the number of friends: {text}.",),
            result,
        )

    def change(self) -> Problem:
        """Cost of several items and the change from a bill."""
        rng = self.rng
        name = rng.choice(NAMES)
        item = rng.choice(("notebook", "pen", "ticket", "sandwich", "plant"))
        price, quantity = rng.randint(2, 15), rng.randint(2, 6)
        cost_text, cost = equation(price, "*", quantity)
        bill = next(value for value in (10, 20, 50, 100, 200) if value >= cost)
        change_text, change = equation(bill, "-", cost)
        return Problem(
            f"A {item} costs {price} dollars. {name} buys {quantity} of them and pays with "
            f"a {bill} dollar bill. How much change does {name} get?",
            (f"The {plural_of(item)} cost {cost_text} dollars.",
             f"The change is {change_text} dollars."),
            change,
        )

    def distance(self) -> Problem:
        """Speed times time."""
        rng = self.rng
        vehicle = rng.choice(("train", "car", "bus", "cyclist", "boat"))
        speed, hours = rng.randint(8, 120), rng.randint(2, 9)
        text, result = equation(speed, "*", hours)
        return Problem(
            f"A {vehicle} travels at {speed} kilometers per hour for {hours} hours. "
            "How far does it travel?",
            (f"Distance is speed times time: {text} kilometers.",),
            result,
        )

    def rectangle(self) -> Problem:
        """Perimeter of a rectangle in two steps."""
        rng = self.rng
        place = rng.choice(("garden", "room", "field", "table", "poster"))
        length, width = rng.randint(3, 40), rng.randint(2, 30)
        half_text, half = equation(length, "+", width)
        text, result = equation(2, "*", half)
        return Problem(
            f"A {place} is {length} meters long and {width} meters wide. "
            "What is its perimeter?",
            (f"Length plus width is {half_text} meters.", f"The perimeter is {text} meters."),
            result,
        )

    def average(self) -> Problem:
        """Mean of a few numbers chosen so the division is exact."""
        rng = self.rng
        name = rng.choice(NAMES)
        values = [rng.randint(40, 100) for _ in range(rng.randint(2, 4))]
        values.append(rng.randint(40, 100))
        while sum(values) % len(values):
            values[-1] += 1
        steps = []
        total = values[0]
        for value in values[1:]:
            text, total = equation(total, "+", value)
            steps.append(f"{text}.")
        text, mean = equation(total, "/", len(values))
        steps = [f"First add the scores: {' '.join(steps)}",
                 f"Then divide by {len(values)}: {text}."]
        listed = ", ".join(str(value) for value in values[:-1]) + f" and {values[-1]}"
        return Problem(
            f"{name} scored {listed} points in {len(values)} games. "
            "What is the average score?",
            tuple(steps),
            mean,
        )

    def reading(self) -> Problem:
        """Pages left after reading a fixed number per day."""
        rng = self.rng
        name = rng.choice(NAMES)
        per_day, days = rng.randint(5, 30), rng.randint(2, 7)
        read_text, read = equation(per_day, "*", days)
        pages = read + rng.randint(0, 200)
        left_text, left = equation(pages, "-", read)
        return Problem(
            f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days. "
            "How many pages are left?",
            (f"{name} reads {read_text} pages.", f"The pages left are {left_text}."),
            left,
        )

    def difference(self) -> Problem:
        """How many more one person has than another."""
        rng = self.rng
        first, second = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        small = rng.randint(3, 60)
        large = small + rng.randint(1, 60)
        text, result = equation(large, "-", small)
        return Problem(
            f"{first} has {large} {item} and {second} has {small} {item}. "
            f"How many more {item} does {first} have?",
            (f"Subtract the smaller amount from the larger one: {text}.",),
            result,
        )


# --------------------------------------------------------------------------- #
# Chat
# --------------------------------------------------------------------------- #

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are a friendly tutor who helps with words and numbers.",
                  "You are a careful assistant that always checks its arithmetic.")
SHOUT_PROMPT = "Always answer in capital letters."
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
             ("open", "closed"), ("full", "empty"), ("early", "late"), ("high", "low"),
             ("long", "short"), ("wet", "dry"), ("loud", "quiet"), ("strong", "weak"),
             ("clean", "dirty"), ("heavy", "light"), ("first", "last"), ("young", "old"),
             ("day", "night"), ("up", "down"), ("left", "right"), ("hard", "soft"))
CHAT_WORDS = tuple(sorted({noun for topic in TOPICS for noun in topic.nouns}))
OPERATION_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def spelled_count(rng: random.Random, count: int) -> str:
    """A count as digits or as a word."""
    return NUMBER_WORDS[count - 2] if rng.random() < 0.5 else str(count)


class ChatGenerator:
    """Conversations whose assistant answers follow from the user's requests."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def conversation(self) -> Conversation:
        """An optional system message and one to four user/assistant turns."""
        rng = self.rng
        messages: Conversation = []
        shout = False
        if rng.random() < 0.5:
            shout = rng.random() < 0.15
            content = SHOUT_PROMPT if shout else rng.choice(SYSTEM_PROMPTS)
            messages.append({"role": "system", "content": content})
        previous: int | None = None
        for _ in range(rng.randint(1, 4)):
            question, answer, previous = self.exchange(previous)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer.upper() if shout else answer})
        return messages

    def exchange(self, previous: int | None) -> tuple[str, str, int | None]:
        """A question, its answer and the numeric result a follow-up can refer to."""
        if previous is not None and self.rng.random() < 0.4:
            return self.follow_up(previous)
        tasks: tuple[Callable[[], tuple[str, str, int | None]], ...] = (
            self.arithmetic, self.arithmetic, self.repeat, self.repeat_times, self.spell,
            self.letters, self.backwards, self.capitals, self.plural, self.opposite,
            self.larger, self.sort, self.successor, self.parity, self.greeting,
        )
        return self.rng.choice(tasks)()

    def follow_up(self, previous: int) -> tuple[str, str, int | None]:
        """An operation applied to the previous numeric answer."""
        rng = self.rng
        op = rng.choice(("+", "*", "-") if previous > 0 else ("+", "*"))
        if op == "*":
            amount = rng.randint(2, 5)
        elif op == "-":
            amount = rng.randint(1, min(previous, 50))
        else:
            amount = rng.randint(1, 50)
        question = {"+": f"Now add {amount} to that.", "*": f"Now multiply that by {amount}.",
                    "-": f"Now subtract {amount} from that."}[op]
        text, result = equation(previous, op, amount)
        return question, f"{text}.", result

    def arithmetic(self) -> tuple[str, str, int | None]:
        """Addition, subtraction or multiplication."""
        rng = self.rng
        op = rng.choice(("+", "-", "*"))
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            if op == "-" and b > a:
                a, b = b, a
        question = rng.choice((f"What is {a} {op} {b}?",
                               f"Calculate {a} {OPERATION_WORDS[op]} {b}.",
                               f"Can you compute {a} {op} {b} for me?"))
        text, result = equation(a, op, b)
        return question, f"{text}.", result

    def repeat(self) -> tuple[str, str, int | None]:
        """Echo one word."""
        word = self.rng.choice(CHAT_WORDS)
        question = self.rng.choice((f"Repeat the word {word}.", f"Say the word {word}.",
                                    f"Please repeat this word: {word}"))
        return question, word, None

    def repeat_times(self) -> tuple[str, str, int | None]:
        """Echo one word several times."""
        word = self.rng.choice(CHAT_WORDS)
        count = self.rng.randint(2, 5)
        return (f"Repeat the word {word} {spelled_count(self.rng, count)} times.",
                " ".join([word] * count), None)

    def spell(self) -> tuple[str, str, int | None]:
        """Spell a word letter by letter."""
        word = self.rng.choice(CHAT_WORDS)
        return f"Spell the word {word}.", f"{word} is spelled {'-'.join(word)}.", None

    def letters(self) -> tuple[str, str, int | None]:
        """Count the letters of a word."""
        word = self.rng.choice(CHAT_WORDS)
        return (f"How many letters are in the word {word}?",
                f"The word {word} has {len(word)} letters.", len(word))

    def backwards(self) -> tuple[str, str, int | None]:
        """Reverse a word."""
        word = self.rng.choice(CHAT_WORDS)
        return f"Write the word {word} backwards.", word[::-1], None

    def capitals(self) -> tuple[str, str, int | None]:
        """Upper-case a word."""
        word = self.rng.choice(CHAT_WORDS)
        return f"Write the word {word} in capital letters.", word.upper(), None

    def plural(self) -> tuple[str, str, int | None]:
        """Plural of a noun."""
        word = self.rng.choice(CHAT_WORDS)
        return f"What is the plural of {word}?", f"The plural of {word} is {plural_of(word)}.", None

    def opposite(self) -> tuple[str, str, int | None]:
        """Antonym from a fixed table, asked in either direction."""
        pair = self.rng.choice(OPPOSITES)
        word, other = pair if self.rng.random() < 0.5 else pair[::-1]
        return f"What is the opposite of {word}?", f"The opposite of {word} is {other}.", None

    def larger(self) -> tuple[str, str, int | None]:
        """Compare two numbers."""
        a, b = self.rng.sample(range(1, 1000), 2)
        return (f"Which number is larger, {a} or {b}?",
                f"{max(a, b)} is larger than {min(a, b)}.", max(a, b))

    def sort(self) -> tuple[str, str, int | None]:
        """Sort a few numbers."""
        values = self.rng.sample(range(1, 100), self.rng.randint(3, 6))
        listed = ", ".join(str(value) for value in values)
        ordered = ", ".join(str(value) for value in sorted(values))
        return f"Sort these numbers from smallest to largest: {listed}.", ordered, None

    def successor(self) -> tuple[str, str, int | None]:
        """The next integer."""
        n = self.rng.randint(0, 998)
        return f"What number comes after {n}?", f"{n + 1} comes after {n}.", n + 1

    def parity(self) -> tuple[str, str, int | None]:
        """Even or odd."""
        n = self.rng.randint(0, 999)
        return f"Is {n} even or odd?", f"{n} is {'odd' if n % 2 else 'even'}.", n

    def greeting(self) -> tuple[str, str, int | None]:
        """Small talk with a fixed reply per prompt."""
        question, answer = self.rng.choice((
            ("Hello!", "Hello! How can I help you today?"),
            ("Hi there!", "Hi! What can I do for you?"),
            ("Good morning!", "Good morning! How can I help?"),
            ("Thank you!", "You are welcome!"),
        ))
        return question, answer, None


# --------------------------------------------------------------------------- #
# Corpora
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Corpora:
    """All generated documents, before serialization."""

    web: list[str]
    code: list[str]
    math: list[str]
    chat: list[Conversation]
    sharegpt: list[Conversation]

    def texts(self) -> dict[str, list[str]]:
        """The plain-text corpora by name."""
        return {WEB.name: self.web, CODE.name: self.code, MATH.name: self.math}

    def chats(self) -> dict[str, list[Conversation]]:
        """The chat corpora by name (both in role/content form)."""
        return {"chat": self.chat, "chat_sharegpt": self.sharegpt}


def text_corpus(spec: TextCorpusSpec, document: Callable[[random.Random], Iterator[str]],
                count: CountFn) -> list[str]:
    """Documents whose token lengths follow ``spec.lengths``."""
    rng = random.Random(f"{SEED}:{spec.name}")
    return [fill(spec.lengths.sample(rng), count, document(rng)) for _ in range(spec.documents)]


def chat_corpus(name: str, conversations: int) -> list[Conversation]:
    """Seeded conversations in role/content form."""
    generator = ChatGenerator(random.Random(f"{SEED}:{name}"))
    return [generator.conversation() for _ in range(conversations)]


def generate_corpora(count: CountFn) -> Corpora:
    """Generate every corpus, measuring text lengths with ``count``."""
    return Corpora(
        web=text_corpus(WEB, lambda rng: ProseDocument(rng).pieces(), count),
        code=text_corpus(CODE, lambda rng: CodeDocument(rng).pieces(), count),
        math=text_corpus(MATH, lambda rng: MathDocument(rng).pieces(), count),
        chat=chat_corpus("chat", CHAT_CONVERSATIONS),
        sharegpt=chat_corpus("chat_sharegpt", SHAREGPT_CONVERSATIONS),
    )


def render_chatml(messages: Conversation, add_generation_prompt: bool = False) -> str:
    """The text ``CHAT_TEMPLATE`` renders for ``messages``."""
    text = BOS + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def training_texts(corpora: Corpora) -> list[str]:
    """Tokenizer training input: all documents and every chat turn with its role."""
    texts = [text for documents in corpora.texts().values() for text in documents]
    for conversations in corpora.chats().values():
        texts += [f"{m['role']}\n{m['content']}" for messages in conversations for m in messages]
    return texts


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def train_tokenizer(texts: Sequence[str]) -> Tokenizer:
    """Byte-level BPE with the special tokens first and no BOS/EOS post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """Contents of ``tokenizer_config.json``."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(index): {"content": token, "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False, "special": True}
            for index, token in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def write_jsonl(path: Path, records: Sequence[dict[str, object]]) -> None:
    """One JSON object per line, keys sorted."""
    lines = [json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records]
    path.write_text("".join(lines), encoding="utf-8")


def write_assets(out: Path, corpora: Corpora, tokenizer: Tokenizer) -> None:
    """Write the corpora and tokenizer files under ``out``."""
    data, tokenizer_dir = out / "data", out / "tokenizer"
    data.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name, documents in corpora.texts().items():
        write_jsonl(data / f"{name}.jsonl", [{"text": text} for text in documents])
    write_jsonl(data / "chat.jsonl", [{"messages": messages} for messages in corpora.chat])
    write_jsonl(data / "chat_sharegpt.jsonl", [
        {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]}
                           for m in messages]}
        for messages in corpora.sharegpt
    ])
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"), pretty=True)
    config = json.dumps(tokenizer_config(), indent=2, sort_keys=True, ensure_ascii=False)
    (tokenizer_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    (tokenizer_dir / "chat_template_no_generation.jinja").write_text(
        CHAT_TEMPLATE_NO_GENERATION + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- #
# Verification and statistics
# --------------------------------------------------------------------------- #


def check_equations(text: str) -> None:
    """Assert that every ``a op b = c`` in ``text`` is correct."""
    for a, op, b, result in EQUATION.findall(text):
        assert equation(int(a), op, int(b))[1] == int(result), (a, op, b, result)


def verify_content(corpora: Corpora) -> None:
    """Check that code parses and that math solutions and chat answers compute correctly."""
    for text in corpora.code:
        ast.parse(text)
    for text in corpora.math:
        check_equations(text)
    for conversations in corpora.chats().values():
        for messages in conversations:
            for message in messages:
                check_equations(message["content"])


def verify_tokenizer(out: Path, corpora: Corpora) -> None:
    """Load the saved tokenizer with transformers and torchtitan and check its behaviour."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from transformers import AutoTokenizer

    path = out / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.is_fast, type(tok)
    assert len(tok) == VOCAB_SIZE and tok.vocab_size == VOCAB_SIZE, (len(tok), tok.vocab_size)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids([IM_START, IM_END]) == [3, 4]
    assert tok("")["input_ids"] == [] and tok.backend_tokenizer.encode("").ids == []

    no_generation = (path / "chat_template_no_generation.jinja").read_text(encoding="utf-8")
    for messages in corpora.chat + corpora.sharegpt:
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert rendered == render_chatml(messages), rendered
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == render_chatml(messages, add_generation_prompt=True)
        plain = tok.apply_chat_template(messages, tokenize=False, chat_template=no_generation)
        assert plain == rendered
        out_dict = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        ids, mask = out_dict["input_ids"], out_dict["assistant_masks"]
        assert ids == tok.backend_tokenizer.encode(rendered).ids and ids[0] == 0
        assert any(mask) and len(mask) == len(ids)
        masked = tok.decode([i for i, m in zip(ids, mask) if m])
        expected = "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
        assert masked == expected, (masked, expected)

    for documents in corpora.texts().values():
        assert tok.batch_decode(tok(documents)["input_ids"]) == documents

    titan = HuggingFaceTokenizer(str(path))
    assert (titan.bos_id, titan.eos_id) == (0, 1), (titan.bos_id, titan.eos_id)
    assert titan.get_vocab_size() == VOCAB_SIZE
    hello = titan.encode("hello", add_bos=True, add_eos=True)
    assert hello[0] == 0 and hello[-1] == 1 and len(hello) > 2, hello
    assert titan.encode("hello") == hello[1:-1]
    assert titan.decode(hello[1:-1]) == "hello"


@dataclass(frozen=True)
class LengthStats:
    """Summary of document lengths in tokens."""

    documents: int
    median: int
    p95: int
    maximum: int
    over_512: int
    over_2048: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        """Statistics of a non-empty list of lengths (nearest-rank percentiles)."""
        ordered = sorted(lengths)

        def rank(q: float) -> int:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        return cls(len(ordered), rank(0.5), rank(0.95), ordered[-1],
                   sum(n > 512 for n in ordered), sum(n > 2048 for n in ordered))


def length_stats(tokenizer: Tokenizer, corpora: Corpora) -> dict[str, LengthStats]:
    """Token-length statistics per corpus; chats are measured on their ChatML rendering."""

    def lengths(texts: list[str]) -> list[int]:
        return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]

    stats = {name: LengthStats.of(lengths(texts)) for name, texts in corpora.texts().items()}
    for name, conversations in corpora.chats().items():
        stats[name] = LengthStats.of(lengths([render_chatml(m) for m in conversations]))
    return stats


def check_distribution(stats: dict[str, LengthStats], out: Path) -> None:
    """Assert the length and size properties the tests rely on."""
    web = stats[WEB.name]
    assert 150 <= web.median <= 210, web
    assert web.over_512 >= 0.02 * web.documents and web.over_2048 >= 3, web
    assert web.maximum <= 1.05 * WEB.lengths.maximum, web
    assert 120 <= stats[CODE.name].median <= 180, stats[CODE.name]
    assert 95 <= stats[MATH.name].median <= 145, stats[MATH.name]
    total = sum(path.stat().st_size for path in (out / "data").glob("*.jsonl"))
    assert total < MAX_CORPUS_BYTES, total


def readme(out: Path, stats: dict[str, LengthStats]) -> str:
    """The README text, including file sizes and length statistics."""
    files = "\n".join(
        f"| `{name}` | {(out / name).stat().st_size:,} | {text} |"
        for name, text in ASSET_FILES.items()
    )
    targets = {
        spec.name: f"lognormal, median {spec.lengths.median:g}, sigma {spec.lengths.sigma:g}, "
                   f"clipped to {spec.lengths.minimum}-{spec.lengths.maximum}"
        for spec in (WEB, CODE, MATH)
    }
    rows = "\n".join(
        f"| {name} | {targets.get(name, '1-4 turns')} | {s.documents} | {s.median} | {s.p95} "
        f"| {s.maximum} | {s.over_512} | {s.over_2048} |"
        for name, s in stats.items()
    )
    return f"""# ext/assets

Small tokenizer and corpora shipped with the package for CPU runs and tests.

Everything in this folder except `__init__.py` and `build.py` is written by

    python -m ext.assets.build

which regenerates it byte for byte (fixed seeds, sorted JSON keys, no timestamps)
and checks it (tokenizer loads in `transformers` and torchtitan, assistant masks,
round trips, code parses, arithmetic is correct). Do not edit the files by hand.

All text is synthetic: it is produced by `build.py` from its own word lists,
grammar templates and seeded random choices. No downloaded or copied data.

Special tokens: `<|begin_of_text|>` (0, BOS), `<|end_of_text|>` (1, EOS),
`<|pad|>` (2), `<|im_start|>` (3), `<|im_end|>` (4). The tokenizer adds no
BOS/EOS by itself.

## Files

| file | bytes | contents |
|---|---:|---|
{files}

## Token lengths

Each text document is filled with sentences, code blocks or problems until its
token count is closest to a target drawn from the distribution below. Lengths
are measured with `tokenizer/tokenizer.json`, no BOS/EOS; chat corpora are
measured on their ChatML rendering (BOS included). Percentiles are nearest-rank.

| corpus | target length | docs | median | p95 | max | > 512 | > 2048 |
|---|---|---:|---:|---:|---:|---:|---:|
{rows}
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Generate, write, verify and summarize the assets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: the ext/assets package folder)")
    out: Path = parser.parse_args(argv).out

    pilot = train_tokenizer(training_texts(generate_corpora(approximate_token_count)))
    corpora = generate_corpora(lambda text: len(pilot.encode(text).ids))
    verify_content(corpora)
    tokenizer = train_tokenizer(training_texts(corpora))
    write_assets(out, corpora, tokenizer)
    verify_tokenizer(out, corpora)
    stats = length_stats(tokenizer, corpora)
    check_distribution(stats, out)
    (out / "README.md").write_text(readme(out, stats), encoding="utf-8")

    print(f"wrote assets to {out}")
    for name in [*ASSET_FILES, "README.md"]:
        print(f"  {name:45} {(out / name).stat().st_size:>10,} bytes")
    header = ("docs", "median", "p95", "max", ">512", ">2048")
    print(f"  {'corpus':14}" + "".join(f" {column:>7}" for column in header))
    for name, s in stats.items():
        values = (s.documents, s.median, s.p95, s.maximum, s.over_512, s.over_2048)
        print(f"  {name:14}" + "".join(f" {value:>7}" for value in values))


if __name__ == "__main__":
    main()
