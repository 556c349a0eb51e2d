"""Offline tokenizers learned from the training captions: CLIP's (also used for SigLIP) and SigLIP 2's.

No tokenizer can be downloaded when training from scratch offline, so we learn byte-level BPE merges from the
captions with the `tokenizers` library's BPE trainer, through CLIPTokenizer's own normaliser and pre-tokenizer
(the merges are learned on exactly the pieces the tokenizer will later meet), and hand them to
`CLIPTokenizer(vocab=..., merges=...)`. The vocabulary follows CLIP's layout: 256 byte symbols, the same 256 with
the end-of-word suffix `</w>`, the learned merges, then `<|startoftext|>` and `<|endoftext|>` last, so end-of-text
has the highest id (CLIP's legacy pooling takes the argmax of `input_ids`).

A SigLIP 2 folder always loads its tokenizer as `Siglip2Tokenizer` (transformers overrides the class its files
name), so a from-scratch SigLIP 2 gets one of those: its lowercasing and "▁" word marks, byte fallback, padding on
the left; the merges are learned within words.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, Siglip2Tokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's text tower has 77 positions: captions and prompts are truncated to this many tokens.
MAX_TEXT_TOKENS = 77
# The 256 printable stand-ins for the bytes (sorted: the library returns them in a different order every run).
BYTE_SYMBOLS = sorted(pre_tokenizers.ByteLevel.alphabet())


def learn_merges(captions: Iterable[str], max_merges: int = 4000, min_frequency: int = 2) -> list[tuple[str, str]]:
    """BPE merges in the order learned: repeatedly the most frequent adjacent pair, until no pair occurs
    `min_frequency` times or `max_merges` is reached."""
    clip_backend = _clip_tokenizer([]).backend_tokenizer
    learner = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    learner.normalizer = clip_backend.normalizer
    learner.pre_tokenizer = clip_backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        # Room for every byte symbol with and without the suffix plus max_merges; extra merges are cut below.
        vocab_size=2 * len(BYTE_SYMBOLS) + max_merges,
        min_frequency=min_frequency,
        initial_alphabet=BYTE_SYMBOLS,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    learner.train_from_iterator(_texts(captions), trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    return [tuple(merge.split(" ") if isinstance(merge, str) else merge) for merge in merges[:max_merges]]


def _texts(captions: Iterable) -> Iterable[str]:
    """The captions that are text (a skipped row's caption may be None)."""
    return (caption for caption in captions if isinstance(caption, str))


def build_offline_tokenizer(
    captions: Iterable[str], max_merges: int = 4000, max_length: int = MAX_TEXT_TOKENS
) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges were learned from `captions`; any text still tokenizes (down to bytes).
    `max_length`: the text tower's positions (77 for CLIP, 64 for SigLIP)."""
    return _clip_tokenizer(learn_merges(captions, max_merges=max_merges), max_length)


def _clip_tokenizer(merges: list[tuple[str, str]], max_length: int = MAX_TEXT_TOKENS) -> CLIPTokenizer:
    tokens = [*BYTE_SYMBOLS, *(symbol + END_OF_WORD for symbol in BYTE_SYMBOLS)]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


SIGLIP2_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Siglip2Tokenizer's, in its id order
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]  # byte fallback: any text still tokenizes


def build_offline_siglip2_tokenizer(captions: Iterable[str], max_merges: int = 4000) -> Siglip2Tokenizer:
    """A Siglip2Tokenizer (64 tokens, padded on the left) whose BPE merges were learned from `captions`."""
    learner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    learner.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    # Learned word by word ("▁" starts a word), so no merge spans two words.
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    specials = SIGLIP2_SPECIAL_TOKENS + BYTE_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + max_merges, min_frequency=2, special_tokens=specials, show_progress=False
    )
    learner.train_from_iterator(_texts(captions), trainer)
    state = json.loads(learner.to_str())["model"]
    merges = [tuple(merge.split(" ") if isinstance(merge, str) else merge) for merge in state["merges"]]
    return Siglip2Tokenizer(vocab=state["vocab"], merges=merges, model_max_length=64)
