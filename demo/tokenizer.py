"""The demo tokenizer: byte-level BPE trained with `tokenizers` on the demo corpus, plus a chat template.

Special tokens (ids fixed, in this order): <|pad|>=0, <|bos|>=1, <|eos|>=2, <|user|>=3, <|assistant|>=4.
A chat turn renders as

    <|bos|><|user|>\\n{user message}\\n<|assistant|>\\n{reply}<|eos|>

and plain text is encoded as `<|bos|>` + text (the post-processor adds the bos, as a Llama tokenizer does).
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")
PAD, BOS, EOS, USER, ASSISTANT = SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] }}{{ eos_token }}"
    "{% else %}"
    "<|user|>\n{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_prompt(user_message: str) -> str:
    """The text the chat template renders for one user turn with the generation prompt (no bos)."""
    return f"{USER}\n{user_message}\n{ASSISTANT}\n"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A PreTrainedTokenizerFast trained on `texts`; its length is at most `vocab_size`.

    Deterministic for a given text sequence (single-threaded BPE training has no random tie-breaks).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    return fast
