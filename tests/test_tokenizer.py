"""The offline tokenizer: learned from captions, CLIP-compatible, saved and reloaded with the model."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoTokenizer, CLIPTokenizer

from clip_accel.tokenizer import BOS_TOKEN, EOS_TOKEN, build_offline_tokenizer, learn_merges


def test_frequent_words_become_single_tokens(offline_tokenizer):
    tokens = offline_tokenizer.convert_ids_to_tokens(offline_tokenizer("red striped kurta")["input_ids"])
    assert tokens == [BOS_TOKEN, "red</w>", "striped</w>", "kurta</w>", EOS_TOKEN]


def test_end_of_text_has_the_highest_id_and_pads(offline_tokenizer):
    # CLIP's legacy pooling takes argmax(input_ids): end-of-text must be the largest id.
    assert offline_tokenizer.eos_token_id == len(offline_tokenizer) - 1
    assert offline_tokenizer.pad_token_id == offline_tokenizer.eos_token_id
    assert offline_tokenizer.bos_token_id == len(offline_tokenizer) - 2


def test_unseen_text_still_tokenizes_down_to_bytes(offline_tokenizer):
    ids = offline_tokenizer("Zebra ünïcode 42 ✓")["input_ids"]
    assert offline_tokenizer.unk_token_id not in ids[1:-1]
    assert offline_tokenizer.decode(ids, skip_special_tokens=True) == "zebra ünïcode 4 2 ✓"


def test_learning_is_deterministic_and_respects_min_frequency():
    captions = ["silk saree", "silk saree", "cotton kurta"]
    assert learn_merges(captions) == learn_merges(list(captions))
    # The same vocabulary in another process: the preprocessing cache is keyed by the tokenizer.
    script = "import json, clip_accel.tokenizer as t; print(json.dumps(t.build_offline_tokenizer(%r).get_vocab()))"
    other = subprocess.run([sys.executable, "-c", script % captions], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == build_offline_tokenizer(captions).get_vocab()
    merged = {left + right for left, right in learn_merges(captions)}
    assert "silk</w>" in merged and "kurta</w>" not in merged  # seen once: below min_frequency 2


def test_long_captions_truncate_to_77_and_keep_end_of_text(offline_tokenizer):
    ids = offline_tokenizer(" ".join(["red"] * 200), truncation=True, max_length=77)["input_ids"]
    assert len(ids) == 77 and ids[-1] == offline_tokenizer.eos_token_id


def test_round_trips_through_save_pretrained(offline_tokenizer, tmp_path):
    offline_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, CLIPTokenizer)
    text = ["Women's red striped cotton kurta with gold border", "unseen words too"]
    assert loaded(text)["input_ids"] == offline_tokenizer(text)["input_ids"]


def test_merges_are_learned_on_clips_own_pieces():
    # CLIP's pre-tokenizer splits digits one by one and keeps punctuation runs apart from letters.
    merged = {left + right for left, right in learn_merges(["abc-123 abc-123 abc-123"])}
    assert "abc</w>" in merged and "12" not in merged and "-1" not in merged


def test_max_merges_cuts_the_list_learned_in_order():
    captions = ["red striped cotton kurta with gold border", "blue silk saree with silver border"] * 3
    assert learn_merges(captions, max_merges=5) == learn_merges(captions)[:5]


def test_empty_caption_list_still_builds_a_usable_tokenizer():
    tokenizer = build_offline_tokenizer([])
    assert tokenizer("abc")["input_ids"][0] == tokenizer.bos_token_id
