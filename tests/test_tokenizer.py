"""The offline tokenizer: learned from captions, CLIP-compatible, saved and reloaded with the model."""

from __future__ import annotations

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


def test_empty_caption_list_still_builds_a_usable_tokenizer():
    tokenizer = build_offline_tokenizer([])
    assert tokenizer("abc")["input_ids"][0] == tokenizer.bos_token_id
