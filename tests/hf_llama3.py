"""Build the Meta-Llama-3 Hugging Face tokenizer offline, from quicktok's bundled ranks."""

from __future__ import annotations


def build_hf_llama3():
    """transformers' TikTokenConverter over quicktok's Llama-3 ranks: the 256 special tokens
    at 128000.. parsed in text, and a post-processor that prepends <|begin_of_text|>."""
    import quicktok
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = quicktok.get_encoding("llama3")
    ranks = {enc.decode_single_token_bytes(i): i for i in range(128000)}
    specials = sorted(enc.special_tokens_set, key=enc.encode_single_token)

    class FromRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, _url):
            return ranks

    backend = FromRanks(vocab_file="llama3", extra_special_tokens=specials).converted()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
