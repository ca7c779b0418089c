"""Tiny Qwen3 models and a locally trained tokenizer, built in a few seconds with no hub access."""

from __future__ import annotations

import os

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(out_dir: str, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(40) for b in range(25)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
    )
    hf.save_pretrained(out_dir)
    return hf


def build_tiny_qwen3(out_dir: str, *, vocab_size: int = 320, hidden: int = 32, layers: int = 2, seed: int = 0,
                     tokenizer=None) -> str:
    """A random Qwen3ForCausalLM (~40k parameters) plus tokenizer, saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = tokenizer or build_tokenizer(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    cfg = AutoConfig.for_model(
        "qwen3", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger logits than the default init, so entropies spread across tokens
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out_dir)
    return out_dir
