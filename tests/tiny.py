"""Tiny Qwen3 models and a locally trained tokenizer for the tests (the embedded default's builders)."""

from __future__ import annotations

from verl_eopd.cpu import embedded


def build_tokenizer(out_dir: str, vocab_size: int = 320):
    """Byte-level BPE with the ChatML specials <|endoftext|> <|im_start|> <|im_end|> (ids 0, 1, 2)."""
    return embedded.build_tokenizer(out_dir, eos_token="<|im_end|>", vocab_size=vocab_size)


def build_tiny_qwen3(out_dir: str, *, vocab_size: int = 320, hidden: int = 32, layers: int = 2, seed: int = 0,
                     tokenizer=None) -> str:
    """A random Qwen3ForCausalLM (~40k parameters) with large logits, so entropies spread across tokens."""
    embedded.build_tiny_qwen3(out_dir, tokenizer or build_tokenizer(out_dir), vocab_size=vocab_size, hidden=hidden,
                              layers=layers, seed=seed, logit_scale=40.0)
    return out_dir
