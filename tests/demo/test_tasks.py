from __future__ import annotations

import pytest

from demo.tasks import LETTERS, TASKS, echo_example, pretrain_texts, split_task


@pytest.mark.parametrize("task", sorted(TASKS))
def test_split_is_deterministic_and_held_out(task):
    a = split_task(task, seed=3, n_train=500, n_eval=50)
    b = split_task(task, seed=3, n_train=500, n_eval=50)
    assert a == b
    assert len(a.train) == 500 and len(a.eval) == 50
    train_prompts = {e.prompt for e in a.train}
    assert len(train_prompts) == 500
    assert not train_prompts & {e.prompt for e in a.eval}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_seed_changes_the_split(task):
    assert split_task(task, 0, 10, 10).eval != split_task(task, 1, 10, 10).eval


def test_reverse_answers_are_the_words_reversed():
    for ex in split_task("reverse", 0, 200, 0).train:
        words = ex.prompt.removeprefix("reverse: ").split(" ")
        assert 3 <= len(words) <= 5
        assert ex.answer.split(" ") == words[::-1]


def test_sort_answers_are_sorted_and_inputs_never_sorted():
    for ex in split_task("sort", 0, 200, 0).train:
        letters = ex.prompt.removeprefix("sort: ").split(" ")
        assert all(len(c) == 1 and c in LETTERS for c in letters)
        assert len(set(letters)) == len(letters)
        assert ex.answer.split(" ") == sorted(letters)
        assert ex.answer != " ".join(letters)  # copying the input never scores


def test_echo_copies_and_pretraining_never_shows_adapter_tasks():
    import itertools
    import random

    ex = echo_example(random.Random(0))
    assert ex.prompt == f"repeat: {ex.answer}"
    for text, chat in itertools.islice(pretrain_texts(0), 2000):
        body = text if chat is None else chat.prompt
        assert not body.startswith(("reverse", "sort"))


def test_unknown_task_is_rejected():
    with pytest.raises(KeyError, match="unknown task"):
        split_task("translate", 0, 1, 1)
