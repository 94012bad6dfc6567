"""The demo's tasks and corpus: seeded, pure generators (no files, no downloads).

Every example is a chat turn `Example(prompt, answer)`; `prompt` is the user message and `answer` the
exact assistant reply. Two kinds of text exist:

- *pretraining* text for the base: plain sentences from a tiny grammar, and chat turns of an echo task
  (`repeat: ...` -> the same words), so the base learns the chat format and copying, but never sees
  the adapter tasks;
- *adapter tasks* with exactly checkable answers: `reverse` (reverse a list of 3-5 words) and `sort`
  (sort 4-6 distinct letters alphabetically). Letters are space-separated so each is one token.

`split_task` draws train and eval sets from one seeded stream and guarantees they are disjoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

NOUNS = (
    "cat dog fox owl bee ant cow pig hen elk bird fish frog duck goat lamb wolf bear deer crab "
    "tree leaf rose seed root moss fern vine bush sun moon star sky rain snow wind fog cloud "
    "sea lake pond river hill rock sand stone road path door wall roof room house barn farm town "
    "city ship boat car bus train bell drum book pen cup bowl box bag hat coat shoe sock ring "
    "key lamp bed desk chair table bread milk cake pie egg rice corn bean plum pear apple lemon "
    "king queen child friend baby girl boy man woman cook baker farmer sailor"
).split()
VERBS = (
    "sees finds likes takes holds makes opens moves helps calls wants needs keeps paints "
    "draws carries pulls pushes follows watches"
).split()
ADJECTIVES = (
    "red blue green black white big small old new tall short warm cold soft hard quick slow "
    "happy quiet loud bright dark wet dry sweet"
).split()
DETERMINERS = ("the", "a", "one", "my", "your", "this", "that")
PREPOSITIONS = ("near", "under", "over", "behind", "beside", "with", "from", "into")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# the words a `reverse` list draws from (nouns only: every one is a single BPE token after training)
REVERSE_WORDS = NOUNS


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message
    answer: str  # the exact expected assistant reply


# ---- pretraining text --------------------------------------------------------------------------


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(NOUNS))
    return " ".join(words)


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar: NP V NP [P NP] ."""
    parts = [_noun_phrase(rng), rng.choice(VERBS), _noun_phrase(rng)]
    if rng.random() < 0.4:
        parts += [rng.choice(PREPOSITIONS), _noun_phrase(rng)]
    return " ".join(parts) + " ."


def echo_example(rng: random.Random) -> Example:
    """`repeat: <words or letters>` -> the same sequence: teaches the chat format and copying."""
    if rng.random() < 0.5:
        items = rng.sample(NOUNS, rng.randint(2, 8))
    else:
        items = rng.sample(LETTERS, rng.randint(3, 8))
    text = " ".join(items)
    return Example(prompt=f"repeat: {text}", answer=text)


def pretrain_texts(seed: int, echo_fraction: float = 0.8) -> Iterator[tuple[str, Example | None]]:
    """An endless seeded stream: ("text", None) for plain sentences or ("", Example) for a chat turn."""
    rng = random.Random(f"pretrain-{seed}")
    while True:
        if rng.random() >= echo_fraction:
            text = " ".join(sentence(rng) for _ in range(rng.randint(1, 2)))
            # repeated passages, as real text has: they teach the base to copy (induction)
            yield (f"{text} {text}" if rng.random() < 0.5 else text), None
        else:
            yield "", echo_example(rng)


# ---- adapter tasks -----------------------------------------------------------------------------


def reverse_example(rng: random.Random) -> Example:
    words = rng.sample(REVERSE_WORDS, rng.randint(3, 5))
    return Example(prompt=f"reverse: {' '.join(words)}", answer=" ".join(reversed(words)))


def sort_example(rng: random.Random) -> Example:
    while True:
        letters = rng.sample(LETTERS, rng.randint(4, 6))
        if letters != sorted(letters):  # an already-sorted input would let plain copying score
            break
    return Example(prompt=f"sort: {' '.join(letters)}", answer=" ".join(sorted(letters)))


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": reverse_example,
    "sort": sort_example,
}


@dataclass(frozen=True)
class TaskSplit:
    task: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]


def split_task(task: str, seed: int, n_train: int, n_eval: int) -> TaskSplit:
    """Distinct examples from one seeded stream: the first `n_eval` unique prompts are the eval set,
    the next `n_train` unique prompts the training set, so no eval prompt is ever trained on."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    make = TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    drawn: list[Example] = []
    attempts = 0
    while len(drawn) < n_eval + n_train:
        attempts += 1
        if attempts > 50 * (n_eval + n_train):
            raise ValueError(f"task {task!r} cannot yield {n_eval + n_train} distinct examples")
        ex = make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            drawn.append(ex)
    return TaskSplit(task=task, eval=tuple(drawn[:n_eval]), train=tuple(drawn[n_eval:]))
