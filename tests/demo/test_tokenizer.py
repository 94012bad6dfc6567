from __future__ import annotations

import pytest

from demo.tokenizer import ASSISTANT, BOS, EOS, PAD, USER, render_prompt, train_tokenizer
from demo.train import corpus_texts, encode_chat, reply_text
from demo.tasks import Example


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus_texts(0, 2000), vocab_size=1024)


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, USER, ASSISTANT)] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 1024


@pytest.mark.parametrize("text", ["the red fox sees a dog .", "sort: q b z a", "reverse: cat sun  x!", "é ü 7"])
def test_round_trip(tok, text):
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_corpus_words_are_single_tokens(tok):
    assert len(tok(" cat", add_special_tokens=False).input_ids) == 1
    assert len(tok(" q", add_special_tokens=False).input_ids) == 1


def test_chat_template_matches_training_format(tok):
    messages = [{"role": "user", "content": "sort: b a"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == BOS + render_prompt("sort: b a")
    served = tok(text, add_special_tokens=False).input_ids
    trained = encode_chat(tok, Example("sort: b a", "a b"), loss_on_prompt=False)
    assert list(trained.ids[: len(served)]) == served
    assert trained.ids[-1] == tok.eos_token_id
    reply = tok.decode(trained.ids[len(served):], skip_special_tokens=True)
    assert reply == reply_text("a b") and reply.strip() == "a b"
    # every reply word is the very token the prompt used for it, so copying is a token match
    assert set(trained.ids[len(served):-1]) <= set(served)


def test_training_is_deterministic(tok):
    again = train_tokenizer(corpus_texts(0, 2000), vocab_size=1024)
    assert again.get_vocab() == tok.get_vocab()
