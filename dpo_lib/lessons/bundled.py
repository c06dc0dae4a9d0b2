"""The bundled preference set: generated hh-rlhf-format dialogues with a preference a 135M chat
model can learn and a reader can see, plus a rule-based checker for generated answers.

Every dialogue ends with a factual question from one of several families (arithmetic, capitals,
opposites, unit conversion, letter counts, weekdays and months, irregular plurals, colour
mixing), sometimes after earlier turns. The *chosen* answer is correct and polite. The *rejected*
answer is one of: ``wrong`` (the chosen answer word for word with a wrong fact in it), ``rude``
(the right or a wrong answer wrapped in insults), ``evasive`` (no answer). :func:`judge_response`
tells which of these a generated answer is, so generations before and after DPO can be scored.

Regenerate the files in ``data/bundled/`` and the tiny profile's tokenizer with::

    python -m dpo_lib.lessons.bundled --seed 0
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.config import BUNDLED_DIR, TINY_TOKENIZER_DIR
from ..core.data import ASSISTANT, HUMAN


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo",
    "Canada": "Ottawa", "Australia": "Canberra", "Russia": "Moscow", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
    "Thailand": "Bangkok", "Turkey": "Ankara", "Cuba": "Havana", "Chile": "Santiago",
    "Hungary": "Budapest", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "South Korea": "Seoul", "Vietnam": "Hanoi", "Iran": "Tehran",
    "Colombia": "Bogota", "Morocco": "Rabat", "Nigeria": "Abuja", "Ukraine": "Kyiv",
    "Czechia": "Prague", "Switzerland": "Bern",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
    "light": "dark", "open": "closed", "early": "late", "full": "empty", "high": "low",
    "old": "young", "strong": "weak", "wet": "dry", "loud": "quiet", "hard": "soft",
    "rich": "poor", "thick": "thin", "inside": "outside", "win": "lose", "push": "pull",
    "above": "below", "first": "last", "true": "false", "heavy": "light", "clean": "dirty",
    "day": "night", "north": "south", "east": "west", "buy": "sell", "begin": "end",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "ox": "oxen", "cactus": "cacti",
    "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "life": "lives", "half": "halves", "potato": "potatoes", "hero": "heroes",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
COLOURS = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
           ("red", "white"): "pink", ("black", "white"): "gray"}
WORDS = ["apple", "river", "banana", "garden", "window", "elephant", "pencil", "orange",
         "computer", "mountain", "library", "butterfly", "chair", "ocean", "tiger", "guitar",
         "planet", "rainbow", "kitchen", "blanket", "sun", "cat", "umbrella", "island"]
UNITS = {  # question unit, given unit, factor
    "centimeters": ("meters", 100), "minutes": ("hours", 60), "seconds": ("minutes", 60),
    "grams": ("kilograms", 1000), "months": ("years", 12), "days": ("weeks", 7),
    "millimeters": ("centimeters", 10), "hours": ("days", 24),
}


@dataclass(frozen=True)
class Family:
    """A question family: how to ask, how to answer, and how to invent a wrong answer."""

    name: str
    phrasings: tuple[str, ...]                 # templates with {named} slots
    sample: Callable[[random.Random], dict]    # slot values
    answer: Callable[[dict], str]              # the correct answer for slot values
    sentence: str                              # an answer sentence template, {answer} slot
    wrong: Callable[[dict, random.Random], str]
    numeric: bool = False
    vocabulary: tuple[str, ...] = ()           # every answer this family can have (word families)


def _wrong_number(correct: int, rng: random.Random) -> str:
    candidates = [correct + d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if correct + d >= 0]
    return str(rng.choice(candidates))


def _other(options, correct: str, rng: random.Random) -> str:
    return rng.choice(sorted(set(options) - {correct}))


_ARITH = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def _sample_arith(rng):
    op = rng.choice(list(_ARITH))
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if op == "minus" and b > a:
            a, b = b, a
    return {"a": a, "op": op, "b": b}


FAMILIES = [
    Family("arithmetic",
           ("What is {a} {op} {b}?", "Can you tell me what {a} {op} {b} is?",
            "Quick math question: {a} {op} {b}?"),
           _sample_arith,
           lambda s: str(_ARITH[s["op"]](int(s["a"]), int(s["b"]))),
           "{a} {op} {b} is {answer}.",
           lambda s, rng: _wrong_number(_ARITH[s["op"]](int(s["a"]), int(s["b"])), rng),
           numeric=True),
    Family("capital",
           ("What is the capital of {country}?", "Which city is the capital of {country}?",
            "Do you know the capital city of {country}?"),
           lambda rng: {"country": rng.choice(sorted(CAPITALS))},
           lambda s: CAPITALS[s["country"]],
           "The capital of {country} is {answer}.",
           lambda s, rng: _other(CAPITALS.values(), CAPITALS[s["country"]], rng),
           vocabulary=tuple(CAPITALS.values())),
    Family("opposite",
           ("What is the opposite of \"{word}\"?", "What word means the opposite of \"{word}\"?"),
           lambda rng: {"word": rng.choice(sorted(OPPOSITES))},
           lambda s: OPPOSITES[s["word"]],
           "The opposite of \"{word}\" is \"{answer}\".",
           lambda s, rng: _other(OPPOSITES.values(), OPPOSITES[s["word"]], rng),
           vocabulary=tuple(set(OPPOSITES.values()))),
    Family("units",
           ("How many {small} are in {n} {big}?", "How many {small} are there in {n} {big}?"),
           lambda rng: (lambda small: {"small": small, "big": UNITS[small][0],
                                       "n": rng.randint(2, 9)})(rng.choice(sorted(UNITS))),
           lambda s: str(int(s["n"]) * UNITS[s["small"]][1]),
           "There are {answer} {small} in {n} {big}.",
           lambda s, rng: str(int(s["n"]) * UNITS[s["small"]][1] + rng.choice([-10, -1, 1, 10])
                              if UNITS[s["small"]][1] > 12 else
                              (int(s["n"]) + rng.choice([-1, 1])) * UNITS[s["small"]][1]),
           numeric=True),
    Family("letters",
           ("How many letters are in the word \"{word}\"?",
            "How many letters does the word \"{word}\" have?"),
           lambda rng: {"word": rng.choice(WORDS)},
           lambda s: str(len(s["word"])),
           "The word \"{word}\" has {answer} letters.",
           lambda s, rng: str(len(s["word"]) + rng.choice([-2, -1, 1, 2])),
           numeric=True),
    Family("next_day",
           ("What day comes after {day}?", "Which day of the week follows {day}?"),
           lambda rng: {"day": rng.choice(DAYS)},
           lambda s: DAYS[(DAYS.index(s["day"]) + 1) % 7],
           "The day after {day} is {answer}.",
           lambda s, rng: _other(DAYS, DAYS[(DAYS.index(s["day"]) + 1) % 7], rng),
           vocabulary=tuple(DAYS)),
    Family("next_month",
           ("What month comes after {month}?", "Which month follows {month}?"),
           lambda rng: {"month": rng.choice(MONTHS)},
           lambda s: MONTHS[(MONTHS.index(s["month"]) + 1) % 12],
           "The month after {month} is {answer}.",
           lambda s, rng: _other(MONTHS, MONTHS[(MONTHS.index(s["month"]) + 1) % 12], rng),
           vocabulary=tuple(MONTHS)),
    Family("plural",
           ("What is the plural of \"{noun}\"?", "How do you say more than one \"{noun}\"?"),
           lambda rng: {"noun": rng.choice(sorted(PLURALS))},
           lambda s: PLURALS[s["noun"]],
           "The plural of \"{noun}\" is \"{answer}\".",
           lambda s, rng: s["noun"] + "s" if s["noun"] + "s" != PLURALS[s["noun"]]
           else _other(PLURALS.values(), PLURALS[s["noun"]], rng),
           vocabulary=tuple(set(PLURALS.values()))),
    Family("colour",
           ("What colour do you get when you mix {c1} and {c2}?",
            "If I mix {c1} paint with {c2} paint, what colour do I get?"),
           lambda rng: (lambda pair: {"c1": pair[0], "c2": pair[1]})(rng.choice(sorted(COLOURS))),
           lambda s: COLOURS[(s["c1"], s["c2"])],
           "Mixing {c1} and {c2} gives {answer}.",
           lambda s, rng: _other(COLOURS.values(), COLOURS[(s["c1"], s["c2"])], rng),
           vocabulary=tuple(COLOURS.values())),
]

POLITE = ("{sentence}", "Sure! {sentence}", "Good question. {sentence}",
          "{sentence} I hope that helps!", "Happy to help: {sentence}",
          "{sentence} Let me know if you have another question.")
RUDE = ("Ugh. {sentence} Even a child knows that.",
        "Obviously. {sentence} Stop wasting my time with stupid questions.",
        "Figure it out yourself next time. {sentence}",
        "{sentence} Honestly, how do you not know this? Pathetic.",
        "Whatever. {sentence} Don't bother me again.")
EVASIVE = ("I'd rather not answer that.", "That's not something I can help with.",
           "Why do you want to know?", "Hmm, hard to say. Maybe look it up somewhere.",
           "I don't really feel like answering questions today.",
           "You could probably find that in a book.")
GREETINGS = (("Hi there!", "Hello! How can I help you today?"),
             ("Hello, can I ask you a few questions?", "Of course, go ahead."),
             ("Good morning!", "Good morning! What would you like to know?"),
             ("I have a homework question.", "Sure, I'm happy to help. What is it?"))

#: Words that mark an answer as rude, and phrases that mark it as evasive (lower case).
RUDE_MARKERS = ("ugh", "even a child", "stupid", "wasting my time", "figure it out yourself",
                "pathetic", "whatever", "don't bother me", "idiot", "dumb", "shut up")
EVASIVE_MARKERS = ("rather not", "not something i can help", "why do you want to know",
                   "hard to say", "look it up", "don't really feel like", "find that in a book",
                   "i don't know", "i can't help", "i cannot help")


def _render(template: str, slots: dict) -> str:
    return template.format(**slots)


def _answer_text(family: Family, slots: dict, answer: str, style: str, rng: random.Random,
                 template: str | None = None) -> str:
    sentence = _render(family.sentence, {**slots, "answer": answer})
    template = template or rng.choice(POLITE if style == "polite" else RUDE)
    return " " + template.format(sentence=sentence)


def make_pair(rng: random.Random) -> tuple[dict, dict]:
    """One dialogue as an hh-rlhf row, and its metadata (family, slots, rejected kind)."""
    family = rng.choice(FAMILIES)
    slots = family.sample(rng)
    question = _render(rng.choice(family.phrasings), slots)
    correct = family.answer(slots)
    turns = []
    history = rng.random()
    if history < 0.25:
        turns.append(rng.choice(GREETINGS))
    elif history < 0.5:
        earlier = rng.choice(FAMILIES)
        earlier_slots = earlier.sample(rng)
        turns.append((_render(rng.choice(earlier.phrasings), earlier_slots),
                      _answer_text(earlier, earlier_slots, earlier.answer(earlier_slots),
                                   "polite", rng).strip()))
    prompt = "".join(f"{HUMAN} {h}{ASSISTANT} {a}" for h, a in turns) + f"{HUMAN} {question}" \
        + ASSISTANT
    kind = rng.choices(("wrong", "rude", "evasive"), weights=(0.45, 0.3, 0.25))[0]
    polite = rng.choice(POLITE)
    chosen = _answer_text(family, slots, correct, "polite", rng, template=polite)
    if kind == "wrong":  # the same wording as the chosen answer: the pair differs in the fact only
        rejected = _answer_text(family, slots, family.wrong(slots, rng), "polite", rng,
                                template=polite)
    elif kind == "rude":
        answer = correct if rng.random() < 0.5 else family.wrong(slots, rng)
        rejected = _answer_text(family, slots, answer, "rude", rng)
    else:
        rejected = " " + rng.choice(EVASIVE)
    meta = {"family": family.name, "question": question, "answer": correct, "rejected_kind": kind}
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}, meta


def generate(n_train: int = 2000, n_test: int = 200, seed: int = 0):
    """Train and test rows; no test question (the last human turn) appears in train."""
    rng = random.Random(seed)
    test, test_questions = [], set()
    while len(test) < n_test:
        row, meta = make_pair(rng)
        if meta["question"] not in test_questions:
            test.append(row)
            test_questions.add(meta["question"])
    train = []
    while len(train) < n_train:
        row, meta = make_pair(rng)
        if meta["question"] not in test_questions:
            train.append(row)
    return train, test


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------

def _phrasing_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot in re.findall(r"\{(\w+)\}", template):
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>.+?)", 1)
    return re.compile("^" + pattern + "$")


_PARSERS = [(family, _phrasing_regex(p)) for family in FAMILIES for p in family.phrasings]


def last_question(prompt: str) -> str:
    """The text of the last human turn of an hh-rlhf prompt."""
    text = prompt[:-len(ASSISTANT)] if prompt.endswith(ASSISTANT) else prompt
    return text.rsplit(HUMAN, 1)[-1].strip()


def parse_question(prompt: str) -> tuple[Family, dict] | None:
    """The family and slot values of the prompt's last question, or None if not one of ours."""
    question = last_question(prompt)
    for family, regex in _PARSERS:
        match = regex.match(question)
        if match:
            slots = match.groupdict()
            try:
                family.answer(slots)
            except (KeyError, ValueError):
                continue
            return family, slots
    return None


@dataclass(frozen=True)
class Verdict:
    """``label``: ``good`` (correct and polite), ``wrong``, ``rude``, ``evasive``, or ``unknown``
    (the prompt is not from the bundled families); ``expected``: the correct answer."""

    label: str
    expected: str | None

    @property
    def preferred(self) -> bool:
        return self.label == "good"


def judge_response(prompt: str, response: str) -> Verdict:
    """Tell which side of the bundled preference a (generated) answer falls on.

    Rude markers make it ``rude`` whatever the answer; otherwise the answer decides: for number
    questions the numbers in the response, for word questions the family's answers the
    response names (numbers and words that only echo the question do not count). Evasive
    phrases without the right answer make it ``evasive``; any other answer is ``wrong``.
    """
    parsed = parse_question(prompt)
    if parsed is None:
        return Verdict("unknown", None)
    family, slots = parsed
    expected = family.answer(slots)
    text = response.strip().split(HUMAN)[0].lower()
    if any(marker in text for marker in RUDE_MARKERS):
        return Verdict("rude", expected)
    if family.numeric:
        numbers = set(re.findall(r"-?\d+", text))
        echoed = {str(v) for v in slots.values()} - {expected}  # the question's own numbers
        correct = expected in numbers and numbers <= echoed | {expected}
        answered = bool(numbers - echoed)
    else:
        named = {word.lower() for word in family.vocabulary
                 if re.search(rf"\b{re.escape(word.lower())}\b", text)}
        question_words = {str(v).lower() for v in slots.values()}
        named -= question_words - {expected.lower()}  # the question's own word is no answer
        correct = named == {expected.lower()}
        answered = bool(named)
    if correct:
        return Verdict("good", expected)
    if not answered and (not text or any(m in text for m in EVASIVE_MARKERS)):
        return Verdict("evasive", expected)
    return Verdict("wrong", expected)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def train_tiny_tokenizer(texts, vocab_size: int = 1024):
    """A byte-level BPE like pythia's (eos ``<|endoftext|>``), trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_bundled(seed: int = 0, n_train: int = 2000, n_test: int = 200,
                  out_dir: Path = BUNDLED_DIR, tokenizer_dir: Path = TINY_TOKENIZER_DIR) -> None:
    train, test = generate(n_train, n_test, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(text for row in train for text in row.values())
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    print(f"wrote {len(train)} train and {len(test)} test pairs to {out_dir}, "
          f"and a {tokenizer.get_vocab_size()}-token tokenizer to {tokenizer_dir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args(argv)
    write_bundled(args.seed, args.train, args.test)


if __name__ == "__main__":
    main()
