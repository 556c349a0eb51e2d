"""An offline CLIP tokenizer learned from the training captions.

No tokenizer can be downloaded when training from scratch offline, so we learn byte-level BPE merges from the
captions and hand them to `CLIPTokenizer(vocab=..., merges=...)`. The vocabulary follows CLIP's layout: 256 byte
symbols, the same 256 with the end-of-word suffix `</w>`, the learned merges, then `<|startoftext|>` and
`<|endoftext|>` last, so end-of-text has the highest id (CLIP's legacy pooling takes the argmax of `input_ids`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# Python's `re` has no \p{L}; this mirrors CLIPTokenizer's split (letters, single digits, other symbol runs)
# closely enough that the merges we learn are the ones the real pre-tokenizer will meet.
PIECE_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (the ByteLevel pre-tokenizer's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _word_symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    symbols = [byte_map[byte] for byte in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


def learn_merges(captions: Iterable[str], max_merges: int = 4000, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself, so the result
    is deterministic) until no pair occurs `min_frequency` times or `max_merges` is reached."""
    byte_map = bytes_to_unicode()
    word_counts = Counter(piece for caption in captions for piece in PIECE_PATTERN.findall(caption.lower()))
    words = {_word_symbols(word, byte_map): count for word, count in word_counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best, frequency = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        if frequency < min_frequency:
            break
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def build_offline_tokenizer(captions: Iterable[str], max_merges: int = 4000) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges were learned from `captions`; any text still tokenizes (down to bytes)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    merges = learn_merges(captions, max_merges=max_merges)
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
