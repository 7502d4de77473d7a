"""The tiny tokenizer and the chat format: renders compared with hand-written strings in Qwen3's
format (REFERENCE.md), round trips, save/load, SFT masks and reading completions back."""

from __future__ import annotations

import string

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from factory.chat import (
    IGNORE_INDEX,
    assistant_message,
    assistant_text,
    encode,
    follows_mode,
    prompt_ids,
    render,
    sft_batch,
    sft_example,
    split_response,
    user_message,
)
from factory.errors import CardError
from factory.tokenizer import build_tiny_tokenizer, load_tokenizer

pytestmark = pytest.mark.unit

EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def user(content: str) -> dict:
    return {"role": "user", "content": content}


# --- the tokenizer ---------------------------------------------------------------------------


def test_vocabulary_layout(tok):
    assert len(tok) == 102 <= 128  # the tiny cards' vocab_size
    fixed = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tok.convert_tokens_to_ids(fixed) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert sorted(tok.all_special_ids) == [0, 1, 2, 101]  # 101: <unk>, for text outside the world
    assert encode(tok, "a\tb") == [70, 101, 71]
    # <think> and </think> are not special: they survive skip_special_tokens, as in Qwen3
    ids = [1] + encode(tok, "a<think>b</think>c") + [2, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b</think>c"


def test_round_trip(tok):
    text = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # all 96 characters
    text += "\n  two  spaces , ' . ?\n\n<|im_start|>user\nx<|im_end|>\n<think>\n\n</think>\n\n"
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    plain = "(37+45)*3-18 = 228\n  ok. "
    assert len(encode(tok, plain)) == len(plain)  # one token per character
    assert encode(tok, "<think></think><|im_end|>") == [3, 4, 2]


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (0, 2, 102)
    convo = [user("Compute 2*3. /think"), assistant_message("2*3=6", "6", thinking=True)]
    for thinking in (True, False):
        assert prompt_ids(loaded, convo[:1], thinking) == prompt_ids(tok, convo[:1], thinking)
    text = render(tok, convo)
    assert render(loaded, convo) == text
    assert encode(loaded, text) == encode(tok, text)
    assert loaded.decode(encode(loaded, text)) == text


def test_load_tokenizer(tmp_path):
    assert load_tokenizer("tiny") is load_tokenizer("tiny")
    build_tiny_tokenizer().save_pretrained(tmp_path)
    assert len(load_tokenizer(str(tmp_path))) == 102
    with pytest.raises(CardError, match="no tokenizer at that path"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(CardError, match="hf download"):
        load_tokenizer("no-such-org/no-such-model")  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(CardError):
        load_tokenizer(None)


# --- the chat template (Qwen3's rules) -------------------------------------------------------


def test_generation_prompt_both_modes(tok):
    msgs = [user("Compute 2*3.")]
    head = "<|im_start|>user\nCompute 2*3.<|im_end|>\n<|im_start|>assistant\n"
    assert render(tok, msgs, add_generation_prompt=True) == head
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=True) == head
    no_think = render(tok, msgs, add_generation_prompt=True, enable_thinking=False)
    assert no_think == head + EMPTY_THINK
    assert render(tok, msgs) == "<|im_start|>user\nCompute 2*3.<|im_end|>\n"


def test_system_message_first(tok):
    msgs = [{"role": "system", "content": "Be brief."}, user("hi")]
    assert render(tok, msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_mode_flags_are_plain_text(tok):
    for flag in ("/think", "/no_think"):
        msgs = [user(f"Compute 2*3. {flag}")]
        assert render(tok, msgs, add_generation_prompt=True) == (
            f"<|im_start|>user\nCompute 2*3. {flag}<|im_end|>\n<|im_start|>assistant\n"
        )
    assert user_message("Compute 2*3.", "think") == user("Compute 2*3. /think")
    assert user_message("Compute 2*3.", "no_think") == user("Compute 2*3. /no_think")
    assert user_message("Compute 2*3.", None) == user("Compute 2*3.")
    with pytest.raises(ValueError):
        user_message("x", "deep")


def test_multi_turn_drops_earlier_reasoning(tok):
    msgs = [
        user("Compute 1+2. /think"),
        {"role": "assistant", "content": "3", "reasoning_content": "1+2=3"},
        user("Compute 2*3. /no_think"),
        {"role": "assistant", "content": "<think>\n\n</think>\n\n6"},
        user("Compute 3*4. /think"),
        {"role": "assistant", "content": "<think>\n3*4=12\n</think>\n\n12"},
    ]
    assert render(tok, msgs) == (
        "<|im_start|>user\nCompute 1+2. /think<|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n"
        "<|im_start|>user\nCompute 2*3. /no_think<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
        "<|im_start|>user\nCompute 3*4. /think<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n3*4=12\n</think>\n\n12<|im_end|>\n"
    )
    # the last assistant turn always gets a think block, possibly empty
    last_plain = msgs[:-1] + [{"role": "assistant", "content": "12"}]
    assert render(tok, last_plain).endswith(
        "<|im_start|>user\nCompute 3*4. /think<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n12<|im_end|>\n"
    )


def test_turns_after_the_last_query(tok):
    # assistant turns after the last user message keep reasoning if they have it; only the
    # last one gets an empty block when it has none
    msgs = [
        user("q"),
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "assistant", "content": "a2"},
        {"role": "assistant", "content": "a3"},
    ]
    assert render(tok, msgs) == (
        "<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr1\n</think>\n\na1<|im_end|>\n"
        "<|im_start|>assistant\na2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\na3<|im_end|>\n"
    )


def test_template_refuses_what_it_does_not_render(tok):
    with pytest.raises(TemplateError, match="tools"):
        render(tok, [user("q")], tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(TemplateError, match="tool"):
        render(tok, [user("q"), {"role": "tool", "content": "x"}])


# --- prompts, targets, and reading completions ------------------------------------------------


def test_prompt_ids(tok):
    msgs = [user_message("Compute 2*3.", "think")]
    text = "<|im_start|>user\nCompute 2*3. /think<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_ids(tok, msgs, enable_thinking=True) == encode(tok, text)
    assert prompt_ids(tok, msgs, enable_thinking=False) == encode(tok, text + EMPTY_THINK)
    assert prompt_ids(tok, msgs, True)[:2] == [1] + encode(tok, "u")


def test_assistant_text():
    assert assistant_text("2*3=6", "6", thinking=True) == "<think>\n2*3=6\n</think>\n\n6<|im_end|>"
    assert assistant_text(None, "6", thinking=True) == EMPTY_THINK + "6<|im_end|>"
    assert assistant_text("2*3=6", "6", thinking=False) == "6<|im_end|>"


CONTEXTS = {
    "single": [user_message("Compute 2*3.", "think")],
    "system": [{"role": "system", "content": "sys"}, user_message("Compute 2*3.", None)],
    "multi-turn": [
        user_message("Compute 1+2.", "think"),
        assistant_message("1+2=3", "3", thinking=True),
        user_message("Compute 2*3.", "no_think"),
        assistant_message(None, "6", thinking=False),
        user_message("Compute (1+2)*3.", "think"),
    ],
}


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_sft_example_matches_the_rendered_conversation(tok, context, thinking):
    msgs = CONTEXTS[context]
    reasoning, answer = "1+2=3\n3*3=9", "9"
    ex = sft_example(tok, msgs, reasoning, answer, thinking=thinking, max_len=None)
    prompt = prompt_ids(tok, msgs, enable_thinking=thinking)
    completion = encode(tok, assistant_text(reasoning, answer, thinking))
    assert ex["input_ids"] == prompt + completion
    # what the sampler sees (prompt + completion) is the template's whole conversation, less
    # the newline after the final <|im_end|>
    whole = encode(tok, render(tok, msgs + [assistant_message(reasoning, answer, thinking)]))
    assert whole == ex["input_ids"] + encode(tok, "\n")
    # loss on the completion only, its <|im_end|> included; earlier turns are context
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert ex["labels"][-1] == tok.eos_token_id == 2
    trained = tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    expected = f"<think>\n{reasoning}\n</think>\n\n9<|im_end|>" if thinking else "9<|im_end|>"
    assert trained == expected


def test_sft_example_truncates(tok):
    msgs = [user_message("Compute 2*3.", "think")]
    full = sft_example(tok, msgs, "2*3=6", "6", thinking=True)
    cut = sft_example(tok, msgs, "2*3=6", "6", thinking=True, max_len=len(full["input_ids"]) - 3)
    assert cut["input_ids"] == full["input_ids"][:-3] and cut["labels"] == full["labels"][:-3]


def test_sft_batch_equals_one_at_a_time(tok):
    """The batched builder (one tokenizer call for every text) gives each turn exactly the
    example the one-turn path gives, across contexts, modes and truncation."""
    turns = [(CONTEXTS[c], "1+2=3\n3*3=9", "9", thinking)
             for c in sorted(CONTEXTS) for thinking in (True, False)]
    for max_len in (None, 20):
        batch = sft_batch(tok, turns, max_len=max_len)
        single = []
        for msgs, reasoning, answer, thinking in turns:
            prompt = prompt_ids(tok, msgs, enable_thinking=thinking)
            completion = encode(tok, assistant_text(reasoning, answer, thinking))
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
            single.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
        assert batch == single
    assert sft_batch(tok, []) == []


def test_split_response():
    assert split_response("<think>\n2*3=6\n</think>\n\n6<|im_end|>") == ("2*3=6", "6")
    assert split_response("<think>\n\n</think>\n\n6<|im_end|>") == ("", "6")
    assert split_response("6<|im_end|><|endoftext|><|endoftext|>") == (None, "6")
    assert split_response("  The answer is 6.\n") == (None, "The answer is 6.")
    assert split_response("<think>\n2*3=6\n2*3=") == ("2*3=6\n2*3=", "")  # never answered
    assert split_response("<think>\n2*3=6<|im_end|>") == ("2*3=6", "")
    assert split_response("2*3=6\n</think>\n\n6") == ("2*3=6", "6")  # <think> was in the prompt
    assert split_response("6<|im_end|>\nmore") == (None, "6")
    for reasoning, answer in [("37+45=82\n82*3=246", "246"), (None, "246"), ("", "-3")]:
        text = assistant_text(reasoning, answer, thinking=True)
        assert split_response(text) == (reasoning or "", answer)
    assert split_response(assistant_text("x", "246", thinking=False)) == (None, "246")


def test_follows_mode():
    thought = "<think>\n2*3=6\n</think>\n\n6<|im_end|>"
    empty = "<think>\n\n</think>\n\n6<|im_end|>"
    bare = "6<|im_end|>"
    assert follows_mode(thought, "think")
    assert not follows_mode(empty, "think") and not follows_mode(bare, "think")
    assert follows_mode(empty, "no_think") and follows_mode(bare, "no_think")
    assert not follows_mode(thought, "no_think")
    assert follows_mode("<think>\nstill thinking", "think")  # unclosed, but it thought
    assert all(follows_mode(t, None) for t in (thought, empty, bare))
    with pytest.raises(ValueError):
        follows_mode(bare, "deep")
