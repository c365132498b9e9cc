"""The vectorised fast paths of `encode_documents` agree with the general path exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftpack.templates import ALPACA_TEMPLATE, ChatTemplate, PromptTemplate
from sftpack.tokenize import encode_documents
from sftpack.tokenizers import load_tokenizer

LLAMA3 = load_tokenizer("llama3")
QWEN3 = load_tokenizer("qwen3")
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def _both(tok, docs, train_on_prompt):
    fast = encode_documents(tok, docs, train_on_prompt=train_on_prompt, has_specials=False)
    general = encode_documents(tok, docs, train_on_prompt=train_on_prompt, has_specials=True)
    return fast, general


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(text, text), min_size=1, max_size=6), train_on_prompt=st.booleans(),
       qwen=st.booleans())
def test_prompt_template_fast_path_equals_general_path(pairs, train_on_prompt, qwen):
    tok = QWEN3 if qwen else LLAMA3
    template = PromptTemplate(ALPACA_TEMPLATE)
    docs = [template.render([("user", p), ("assistant", r)]) for p, r in pairs]
    if any(tok.special_pattern.search(d.text) for d in docs):
        return  # the fast path is only taken without special-token strings
    fast, general = _both(tok, docs, train_on_prompt)
    assert np.array_equal(fast.tokens, general.tokens)
    assert np.array_equal(fast.mask, general.mask)
    assert np.array_equal(fast.unit_lengths, general.unit_lengths)


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_multi_span_documents_without_specials_take_the_general_mask(train_on_prompt):
    # a chat template with no special tokens: several trained spans in one document
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
                            bos_token=None, eos_token=None)
    turns = [("user", "hi"), ("assistant", "héllo"), ("user", "2+2?"), ("assistant", "4")]
    docs = [template.render(turns), template.render(turns[:2])]
    fast, general = _both(LLAMA3, docs, train_on_prompt)
    assert np.array_equal(fast.tokens, general.tokens) and np.array_equal(fast.mask, general.mask)
    if not train_on_prompt:
        trained = LLAMA3.decode([t for t, m in zip(fast.tokens[: fast.unit_lengths[0]], fast.mask) if m])
        # " héllo" is one token holding response bytes: trained whole (the straddling rule)
        assert trained == " héllo4"


SPECIAL_SETS = [
    sorted(LLAMA3.special_tokens),
    sorted(QWEN3.special_tokens),
    sorted(load_tokenizer("cl100k_base").special_tokens),
    # prefixes of one another, regex metacharacters, one character alone
    ["<s>", "<s>x", "<", "<<", "<<<>", "a|b", "[INST]", "[/INST]", ".*", "(", "\\", "<|im_start|>", "<|im_"],
]


@pytest.mark.parametrize("specials", SPECIAL_SETS, ids=["llama3", "qwen3", "cl100k", "prefixes"])
def test_special_token_trie_splits_as_the_longest_first_alternation(specials):
    """The special-token pattern is a trie: it must split any text as the alternation of the
    specials, longest first, splits it (the longest special at the leftmost place)."""
    import random
    import re

    from sftpack.tokenizers import _special_pattern

    alternation = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    trie = _special_pattern(tuple(specials))
    rng = random.Random(7)
    # fragments of specials (prefixes, suffixes, middles) and text around them
    fragments = [s[a:b] for s in specials for a, b in [(0, len(s)), (0, len(s) // 2), (len(s) // 2, len(s))]]
    fragments += ["x", " ", "|", ">", "<", "\n", "é", "_", "0"]
    found = 0
    for _ in range(3000):
        text = "".join(rng.choices(fragments, k=rng.randint(0, 12)))
        parts = alternation.split(text)
        assert trie.split(text) == parts, text
        found += len(parts) > 1
    assert found > 1000  # most texts hold a special


def test_special_token_pattern_takes_long_special_tokens():
    """A special token of hundreds of characters (a tokenizer's added prompt, say) splits
    text as the alternation does: the trie, built and compiled a level per character, must
    not recurse past Python's limit."""
    import re

    from sftpack.tokenizers import _special_pattern

    long = "<|" + "system prompt " * 60 + "|>"
    specials = (long, long[:-2], "<|eot_id|>", "<|")
    alternation = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    text = f"a{long}b{long[:-2]}c<|eot_id|>{long[:100]}"
    assert _special_pattern(specials).split(text) == alternation.split(text)
