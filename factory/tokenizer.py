"""Tokenizers: the tiny world's character-level tokenizer, and loading any other by name.

The tiny tokenizer is what a Qwen3 tokenizer would be if its vocabulary were one token per
printable ASCII character: the same special tokens in the same roles (`<|endoftext|>` pads,
`<|im_end|>` ends a turn and is the eos, `<|im_start|>` opens one; `<think>`/`</think>` are added
tokens that are not "special", so they survive `skip_special_tokens`, REFERENCE.md) and a chat
template that renders plain chats exactly as Qwen3's does. Students and teachers of the tiny world
use it through the same `transformers` API as a real Qwen3 tokenizer, so no code path knows which
one it holds.

Vocabulary (102 ids, within the tiny cards' vocab_size 128):

    0 <|endoftext|> (pad)   1 <|im_start|>   2 <|im_end|> (eos)   3 <think>   4 </think>
    5..99  the printable ASCII characters 0x20..0x7E in order   100 "\\n"   101 <unk>

Any other character (a tab, non-ASCII text in a real benchmark's prompt) becomes <unk>, so the
tiny model can be pointed at MATH-500 or HumanEval; every text of the tiny world itself is ASCII.
"""

from __future__ import annotations

import functools
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from factory.errors import CardError

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos: generation stops at the end of the assistant's turn
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# id = position; the tiny cards (conf/student/tiny.yaml, conf/teacher/tiny-moe.yaml) hard-code
# pad 0 and eos 2, so the order is part of the interface
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)
CHARACTERS = tuple(chr(c) for c in range(0x20, 0x7F)) + ("\n",)
UNK_TOKEN = "<unk>"  # any other character (a tab, non-ASCII text in a real benchmark's prompt)
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(THINK_TOKENS) + len(CHARACTERS) + 1  # 102

# Qwen3's chat template (Qwen/Qwen3-8B tokenizer_config.json) restricted to plain chats: the same
# rules, without the tool-calling branches, which the tiny world never uses and which this
# template refuses rather than drops silently.
# - a first system message is rendered as-is; later system and all user messages likewise;
# - an assistant message's reasoning is `reasoning_content` if given, else whatever precedes
#   `</think>` in its content (and the content is what follows, leading newlines stripped);
# - assistant turns up to the last user query lose their reasoning; those after it keep it as
#   `<think>\n{reasoning}\n</think>\n\n`, and the very last message, if an assistant's, always
#   gets a think block, possibly empty;
# - the generation prompt is `<|im_start|>assistant\n`, with an empty think block appended when
#   `enable_thinking` is false (the non-thinking mode); `/think` and `/no_think` are plain text.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- raise_exception('the tiny tokenizer renders plain chats only (no tools)') }}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif not (message.role == 'system' and loop.first) %}
        {{- raise_exception('the tiny tokenizer renders system, user and assistant messages only, not ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer with Qwen3's special tokens and chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + THINK_TOKENS + CHARACTERS
                                            + (UNK_TOKEN,))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # every character is its own word; added tokens (<|im_start|>, <think>, ...) are matched
    # before pre-tokenization, so they stay single ids
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate, no separator: decode(encode(s)) == s
    # already in the vocabulary, so they keep their ids 0..4
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS + (UNK_TOKEN,)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    assert tok.get_vocab_size() == TINY_VOCAB_SIZE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        # <|im_start|> is special (skipped by skip_special_tokens) as in Qwen3
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would rewrite " ." and " 's" on decode
        model_input_names=["input_ids", "attention_mask"],
    )


@functools.lru_cache(maxsize=1)
def _cached_tiny() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def load_tokenizer(source: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer a card names: "tiny" (built here, one shared instance per process), or a
    hub id or local directory loaded with `AutoTokenizer` (from the local cache when offline).

    The shared tiny instance must not be mutated; call `build_tiny_tokenizer()` for a private one.
    """
    if source is None:
        raise CardError(
            "no tokenizer source: set the card's `tokenizer` (a hub id, a local directory or "
            "'tiny') or its `pretrained` checkpoint"
        )
    if source == "tiny":
        return _cached_tiny()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        # a hub id is "name" or "org/name"; anything else is meant as a local directory
        if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1:
            hint = "no tokenizer at that path: give a directory written by save_pretrained"
        else:
            hint = (
                "a hub id loads from the local Hugging Face cache when offline "
                f"(HF_HUB_OFFLINE=1); fetch it once with `hf download {source}` where there "
                "is network access, or give a local directory"
            )
        raise CardError(
            f"cannot load tokenizer {source!r}: {hint}.\n({type(e).__name__}: {e})"
        ) from e
