from __future__ import annotations

import pytest

from demo.errors import DemoError
from demo.evaluate import EvalItem, chat_messages, exact_match, read_eval, write_eval


def test_exact_match_strips_whitespace_and_counts():
    assert exact_match([" a b \n", "x", "c"], ["a b", "y", " c"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


def test_exact_match_is_case_and_order_sensitive():
    assert exact_match(["A B", "b a"], ["a b", "a b"]) == 0.0


def test_exact_match_needs_one_output_per_item():
    with pytest.raises(DemoError, match="2 outputs for 1 expected"):
        exact_match(["a", "b"], ["a"])


def test_eval_file_round_trip(tmp_path):
    items = [EvalItem("reverse: cat dog", "dog cat"), EvalItem('sort: "q" b', "b q")]
    path = tmp_path / "sub" / "e.jsonl"
    write_eval(path, items)
    assert read_eval(path) == items
    assert chat_messages(items[0]) == [{"role": "user", "content": "reverse: cat dog"}]


def test_bad_eval_line_names_file_and_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "a", "expected": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DemoError, match=r"e\.jsonl:3"):
        read_eval(path)


def test_missing_eval_file_says_how_to_build_it(tmp_path):
    with pytest.raises(DemoError) as err:
        read_eval(tmp_path / "none.jsonl")
    assert "demo build" in err.value.hint
