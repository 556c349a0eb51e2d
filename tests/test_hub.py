"""Publishing: the card is built from the run's own files; a run pushes to a (fake, local) Hub in one commit that
`from_pretrained` loads back; failures say what to do and never show the token.

huggingface_hub reads HF_ENDPOINT at import time, so every run that talks to the fake Hub end to end is a
subprocess with its own environment. Only `check_hub_access` (HfApi reads `constants.ENDPOINT` when built) is
tested in-process, by patching huggingface_hub.constants; from_pretrained is never pointed at the server that way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import FakeHub
from huggingface_hub import ModelCard, constants
from transformers import CLIPModel

from clip_accel.cli import train_and_publish
from clip_accel.config import RECALL_KS
from clip_accel.hub import HubAccessError, _ensure_card, check_hub_access, retry_command, write_model_card
from clip_accel.results import format_results_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "hf_fakeTokenForTheseTests0123456789"
REPO = "user/clip-demo"
RECALL_KEYS = [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in RECALL_KS]
# Embeds the same image and captions with the pushed model (downloaded through from_pretrained) and the local folder,
# then runs the card's own usage snippet.
DOWNLOAD_CHECK = """
import json, sys, torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor
repo, folder, snippet = sys.argv[1:4]
image, texts = Image.new("RGB", (40, 40), (30, 70, 210)), ["a blue silk saree", "a red kurta"]
embeddings = []
for source in (repo, folder):
    model, processor = CLIPModel.from_pretrained(source).eval(), CLIPProcessor.from_pretrained(source)
    inputs = processor(text=texts, images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        embeddings.append((model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
                           model.get_text_features(input_ids=inputs["input_ids"]).pooler_output))
exec(snippet)
print(json.dumps({"identical": all(torch.equal(a, b) for a, b in zip(*embeddings)),
                  "snippet_probabilities": probabilities.tolist()}))
"""


@pytest.fixture(scope="module")
def hub():
    with FakeHub(token=TOKEN) as server:
        yield server


def hub_env(hub: FakeHub, home: str) -> dict:
    """A subprocess environment that talks to the fake Hub only (conftest turned the Hub off for this process);
    `home` is a fresh HF_HOME: an empty download cache and no stored login."""
    env = {k: v for k, v in os.environ.items() if k not in ("HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=home)
    return env


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def train_args(demo_dir: str, model_config: str, output_dir: str, repo_id: str) -> list[str]:
    options = {
        "data_dir": demo_dir,
        "scratch_config": model_config,
        "output_dir": output_dir,
        "cache_dir": output_dir + "-cache",
        "num_train_epochs": 1,
        "max_train_samples": 64,
        "max_eval_samples": 32,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 32,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "seed": 0,
        "hub_model_id": repo_id,
    }
    return ["scripts/train.py", "--push_to_hub", *[str(part) for k, v in options.items() for part in (f"--{k}", v)]]


@pytest.fixture(scope="module")
def pushed_run(hub, tmp_path_factory, demo_dir, tiny_model_config_path):
    """One short training run that pushes to the fake Hub at the end; shared by the tests that read its results."""
    root = tmp_path_factory.mktemp("pushed")
    output_dir = str(root / "out")
    result = run(train_args(demo_dir, tiny_model_config_path, output_dir, REPO), hub_env(hub, str(root / "hf-home")))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result, str(root)


def read_json(output_dir: str, name: str):
    with open(os.path.join(output_dir, name)) as handle:
        return json.load(handle)


def test_card_metadata_and_figures_come_from_the_run_files(pushed_run):
    output_dir, _, _ = pushed_run
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    results = read_json(output_dir, "eval_results.json")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.license == "mit" and {"clip", "contrastive", "clip_accel"} <= set(card.data.tags)
    # Trained from scratch on the demo catalogue: no base model, no dataset id to claim.
    assert card.data.base_model is None and card.data.datasets is None
    assert card.data.model_name == REPO
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        k: results["test"][k] for k in (*RECALL_KEYS, "zero_shot_top1", "zero_shot_top5")
    }
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    # The body's table puts the starting model's figures beside the fine-tuned ones, from the same file.
    rows = {"starting model": results["initial"]["test"], f"{REPO} (this model)": results["test"]}
    assert format_results_table(rows) in card.text
    batch, processes = results["training"]["global_batch_size"], results["training"]["num_processes"]
    assert f"| {batch} = 32 per device x {processes} processes x 1 accumulation steps |" in card.text
    assert f"| `test` | {results['test']['num_pairs']} |" in card.text
    assert f'CLIPModel.from_pretrained("{REPO}")' in card.text


def test_card_names_the_hub_base_model_and_dataset(pushed_run, tmp_path):
    """A fine-tuning run from a Hub checkpoint on a Hub dataset (rewritten config, same figures)."""
    folder = shutil.copytree(pushed_run[0], tmp_path / "finetuned")
    config = read_json(folder, "training_config.json")
    config.update(
        scratch_config=None,
        model_name_or_path="openai/clip-vit-base-patch32",
        data_dir=None,
        dataset_name="someone/fashion-captions",
        freeze="backbones",
    )
    (folder / "training_config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(str(folder)))
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.datasets == ["someone/fashion-captions"]
    assert card.data.model_name == "finetuned"  # no repo id yet: the folder name, and a snippet that loads it
    assert f'CLIPModel.from_pretrained("{folder}")' in card.text
    assert "both encoders were frozen except their final layer norms" in card.text
    # Started from an open_clip repo on the Hub (hf-hub:ORG/NAME, as open_clip names it): that repo is the base.
    (folder / "training_config.json").write_text(json.dumps({**config, "model_name_or_path": "hf-hub:laion/CLIP-x"}))
    assert ModelCard.load(write_model_card(str(folder))).data.base_model == "laion/CLIP-x"
    (folder / "training_config.json").write_text(json.dumps(config))
    # Pushing later rewrites a card rendered before the repo id was known, and keeps one that names the repo.
    _ensure_card(str(folder), "user/finetuned")
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "user/finetuned" and 'from_pretrained("user/finetuned")' in card.text
    (folder / "README.md").write_text(card.content + "\nEdited by hand.\n")
    _ensure_card(str(folder), "user/finetuned")
    assert (folder / "README.md").read_text().endswith("Edited by hand.\n")


def test_card_states_how_captions_were_composed_and_which_pairs_were_positives(pushed_run, tmp_path):
    folder = shutil.copytree(pushed_run[0], tmp_path / "catalogue-run")
    results = read_json(folder, "eval_results.json")
    card = ModelCard.load(write_model_card(str(folder)))  # the demo run: titles, identical-caption positives
    shared, pairs = results["training"]["train_pairs_sharing_a_caption"], results["training"]["train_pairs"]
    assert "**Captions:** the product titles (`product_title`)." in card.text
    assert f"({shared} of {pairs} training pairs share their caption with another)" in card.text
    config = read_json(folder, "training_config.json")
    config.update(caption_template="{product_title}, by {brand}", caption_positives="own")
    (folder / "training_config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(str(folder)))
    assert "composed from each row's columns as `{product_title}, by {brand}`" in card.text
    assert "each pair's only positive was itself" in card.text
    # A folder trained before these options: its own pairs were its only positives, its captions the titles.
    for name in ("caption_template", "caption_positives"):
        del config[name]
    (folder / "training_config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(str(folder)))
    assert "each pair's only positive was itself" in card.text and "the product titles" in card.text


def test_card_says_whether_the_published_weights_are_the_ema_and_states_layer_decay(pushed_run, tmp_path):
    folder = shutil.copytree(pushed_run[0], tmp_path / "ema-run")
    card = ModelCard.load(write_model_card(str(folder)))
    assert "| Weight EMA | off |" in card.text and "layer-wise decay" not in card.text
    config = read_json(folder, "training_config.json")
    for evaluated, said in ((True, "the EMA weights were evaluated and are the published ones"), (False, "kept")):
        config.update(ema_decay=0.9998, ema_warmup=True, ema_eval=evaluated, layer_decay=0.65)
        (folder / "training_config.json").write_text(json.dumps(config))
        card = ModelCard.load(write_model_card(str(folder)))
        assert f"| Weight EMA | decay 0.9998 with timm's warm-up; {said}" in card.text
        assert ("best checkpoint's weight EMA:" in card.text) == evaluated
        assert "layer-wise decay 0.65 per tower" in card.text


@pytest.mark.parametrize("label", [None, "Handwritten digit scans"])
def test_card_names_a_data_folder_by_its_name_or_the_label_given_never_indo_fashion(pushed_run, tmp_path, label):
    """A --data_dir run on some other catalogue in the same layout (seen: a folder of handwritten-digit scans
    called "Indo-fashion" in the card's metadata)."""
    folder = shutil.copytree(pushed_run[0], tmp_path / "digits-run")
    data_dir = tmp_path / "mnist-scans"
    data_dir.mkdir()
    config = read_json(folder, "training_config.json")
    config.update(demo=False, data_dir=str(data_dir), dataset_name=None, dataset_label=label)
    (folder / "training_config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(str(folder)))
    name = label or "mnist-scans"
    assert card.data.datasets is None  # a local folder is not a Hub dataset
    assert {r.dataset_name for r in card.data.eval_results} == {name}
    assert f"classification on the {name}" in card.text and "Indo-fashion (" not in card.text
    assert "indo-fashion" not in str(card.data.to_dict()).lower()


@pytest.mark.parametrize("model_type", ["clip", "siglip2"])
def test_card_code_names_the_transformers_it_needs(tiny_pretrained_dir, tmp_path, model_type):
    """The snippet reads `get_*_features(...).pooler_output` (an output object from transformers 5 on; a tensor
    in 4.x) and loads files transformers 5 saved: the card says so, and it is the package's own minimum."""
    import tomllib

    folder = shutil.copytree(tiny_pretrained_dir, tmp_path / "run")
    arch = read_json(folder, "config.json")
    (folder / "config.json").write_text(json.dumps({**arch, "model_type": model_type}))
    card = ModelCard.load(write_model_card(str(folder)))
    snippet = re.search(r"## How to use\n.*?```python\n(.*?)```", card.text, re.DOTALL).group(1)
    assert snippet.startswith('# pip install "transformers>=5"\n')
    assert "transformers 5 or later" in card.text.split("## How to use")[1].split("## Training data")[0]
    dependencies = tomllib.loads(Path(ROOT, "pyproject.toml").read_text())["project"]["dependencies"]
    assert re.search(r"transformers>=5\.0(,|$)", next(d for d in dependencies if d.startswith("transformers")))


def test_pushed_model_downloads_and_embeds_exactly_like_the_local_folder(hub, pushed_run):
    output_dir, _, root = pushed_run
    pushed = hub.files(REPO)
    commits = [commit for commit in hub.commits if commit["repo"] == REPO]
    assert len(commits) == 1, commits  # one commit: the repo is never half old, half new
    local = {name for name in os.listdir(output_dir) if os.path.isfile(os.path.join(output_dir, name))}
    assert set(pushed) - {".gitattributes"} == local - {"skipped_rows.jsonl"}
    assert all(pushed[name] == Path(output_dir, name).read_bytes() for name in local & set(pushed))
    card = ModelCard(pushed["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.model_name == REPO
    snippet = re.search(r"```python\n(.*?)```", card.text, re.DOTALL).group(1)
    result = run(["-c", DOWNLOAD_CHECK, REPO, output_dir, snippet], hub_env(hub, os.path.join(root, "fresh-home")))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"]
    assert len(report["snippet_probabilities"]) == 3


def test_token_never_appears_in_logs_output_folder_or_pushed_repo(hub, pushed_run):
    output_dir, result, _ = pushed_run
    assert "Pushed" in result.stderr  # the log this checks is the one of a real push
    assert TOKEN not in result.stdout + result.stderr
    for folder, _, names in os.walk(output_dir):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read(), name
    assert not any(TOKEN.encode() in content for content in hub.files(REPO).values())


def test_failed_upload_keeps_the_folder_and_names_the_retry_command(
    hub, tmp_path, demo_dir, tiny_model_config_path, console_script
):
    repo_id, output_dir = "user/clip-retry", str(tmp_path / "out")
    env = hub_env(hub, str(tmp_path / "hf-home"))
    hub.fail_commits = True
    try:
        failed = run(train_args(demo_dir, tiny_model_config_path, output_dir, repo_id), env)
    finally:
        hub.fail_commits = False
    assert failed.returncode != 0
    assert failed.returncode == 2 and "clip-accel train: error: Uploading" in failed.stderr  # no traceback: the
    assert "Traceback" not in failed.stderr and TOKEN not in failed.stdout + failed.stderr  # retry is what to do
    command = retry_command(output_dir, repo_id)
    assert command == f"clip-accel push {output_dir} --hub_model_id {repo_id}"
    assert command in failed.stderr
    for name in ("model.safetensors", "eval_results.json", "README.md", "training_config.json"):
        assert os.path.isfile(os.path.join(output_dir, name)), name
    CLIPModel.from_pretrained(output_dir)
    assert ModelCard.load(os.path.join(output_dir, "README.md")).data.model_name == repo_id
    assert not any(commit["repo"] == repo_id for commit in hub.commits)

    # The command as printed, through the installed console script, against a healthy Hub.
    retried = subprocess.run(
        [console_script("clip-accel"), *shlex.split(command)[1:]], env=env, capture_output=True, text=True, timeout=180
    )
    assert retried.returncode == 0, retried.stderr[-3000:]
    with open(os.path.join(output_dir, "model.safetensors"), "rb") as handle:
        assert hub.files(repo_id)["model.safetensors"] == handle.read()


@pytest.fixture
def hub_in_process(hub, monkeypatch, tmp_path):
    """Point this process's HfApi at the fake Hub, with no token unless a test sets HF_TOKEN."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    return hub


def test_missing_token_fails_before_training_with_how_to_log_in(hub_in_process, make_configs):
    configs = make_configs(push_to_hub=True, hub_model_id="user/never-trained")
    with pytest.raises(HubAccessError, match="hf auth login"):
        train_and_publish(*configs)
    assert not os.path.exists(os.path.join(configs[2].output_dir, "model.safetensors"))
    assert "user/never-trained" not in hub_in_process.repos


def test_rejected_token_fails_before_training_without_showing_it(hub_in_process, make_configs, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenValue987")
    configs = make_configs(push_to_hub=True, hub_model_id="user/never-trained")
    with pytest.raises(HubAccessError, match="hf auth login --force") as raised:
        train_and_publish(*configs)
    assert "hf_wrongTokenValue987" not in str(raised.value)
    assert not os.path.exists(os.path.join(configs[2].output_dir, "model.safetensors"))


def test_namespace_without_write_access_is_named(hub_in_process, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubAccessError, match="someone-else/clip"):
        check_hub_access("someone-else/clip")
    assert check_hub_access("user/clip-access", private=True) == "user/clip-access"
    assert hub_in_process.repos["user/clip-access"].private


def test_read_only_token_is_refused_before_creating_the_repo(hub_in_process, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_in_process, "token_role", "read")
    with pytest.raises(HubAccessError, match="read-only"):
        check_hub_access("user/clip-read-only")
    assert "user/clip-read-only" not in hub_in_process.repos


def test_offline_mode_says_to_unset_it(hub_in_process, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        check_hub_access("user/clip-offline")


def test_card_lists_the_nested_sizes_and_their_test_recall_for_a_matryoshka_run(pushed_run, tmp_path):
    folder = shutil.copytree(pushed_run[0], tmp_path / "nested-run")
    assert "Smaller embeddings" not in ModelCard.load(write_model_card(str(folder))).text  # trained without
    config, results = read_json(folder, "training_config.json"), read_json(folder, "eval_results.json")
    (folder / "training_config.json").write_text(json.dumps({**config, "matryoshka_dims": "8,4"}))
    figures = {size: {**results["test"], "image_to_text_R@1": recall} for size, recall in (("8", 0.3125), ("4", 0.125))}
    (folder / "eval_results.json").write_text(
        json.dumps({**results, "test": {**results["test"], "matryoshka": figures}})
    )
    card = ModelCard.load(write_model_card(str(folder))).text
    assert "Trained with nested sizes (`--matryoshka_dims 8,4`" in card
    full = results["test"]
    assert f"| 16 (full) | {full['image_to_text_R@1']:.4f} | {full['text_to_image_R@1']:.4f} |" in card
    assert f"| 8 | 0.3125 | {full['text_to_image_R@1']:.4f} |" in card
    assert f"| 4 | 0.1250 | {full['text_to_image_R@1']:.4f} |" in card
