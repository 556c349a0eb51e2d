"""Shared fixtures: everything offline, everything tiny, everything built in-process."""

from __future__ import annotations

import os
import sys
import tempfile

# Before datasets/huggingface_hub are imported: no Hub access, and a private datasets cache per test session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="clip-accel-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CLIP_ACCEL_CACHE"] = tempfile.mkdtemp(prefix="clip-accel-test-converted-")  # open_clip conversions

import pytest  # noqa: E402
from transformers import CLIPConfig  # noqa: E402

from clip_accel.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from clip_accel.data.demo import write_demo_dataset  # noqa: E402
from clip_accel.tokenizer import build_offline_tokenizer  # noqa: E402

TINY_IMAGE_SIZE = 32


def pytest_collection_modifyitems(config, items):
    """With ATEN_CPU_CAPABILITY forced (tests/test_kernels.py runs the learning tests so), skip the tests marked
    `native_kernels`. What fails there is a property of torch with a forced capability, not of this project:
    torch.compile's inductor still builds its C++ with -march=native (a CppCompileError under `default`, an abort
    of the whole process under `avx2`), and the bf16 attention kernel chooses its AVX-512 packing from the CPU
    itself ("pack_vnni2 is only supported when avx512 is supported" under `default` on an AVX-512 machine)."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if not forced:
        return
    skip = pytest.mark.skip(reason=f"needs the CPU's own kernels (ATEN_CPU_CAPABILITY={forced}; see conftest.py)")
    for item in items:
        if "native_kernels" in item.keywords:
            item.add_marker(skip)


def installed_script(name: str) -> str:
    """The installed console script `name` (pyproject's [project.scripts]) beside this Python."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.isfile(path), f"{path} is missing: install the package first (pip install -e .)"
    return path


@pytest.fixture(scope="session")
def console_script():
    return installed_script


def tiny_clip_config(vocab_size: int = 600, eos_token_id: int = 2) -> CLIPConfig:
    """Hidden size 32, 2 layers per tower, 32 px images with 8 px patches."""
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return CLIPConfig(
        text_config={**common, "vocab_size": vocab_size, "max_position_embeddings": 77, "eos_token_id": eos_token_id},
        vision_config={**common, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )


def tiny_siglip_values(vocab_size: int = 600) -> dict:
    """A SiglipConfig's values (with `model_type`, as a --scratch_config file holds them): CLIP-tiny's sizes."""
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {
        "model_type": "siglip",
        "text_config": {**common, "vocab_size": vocab_size, "max_position_embeddings": 64},
        "vision_config": {**common, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
    }


def tiny_siglip2_values(vocab_size: int = 600, patch_size: int = 16) -> dict:
    """A Siglip2Config's values (with `model_type`): CLIP-tiny's sizes, a 4 x 4 grid of position embeddings
    (resized to each image's grid), `patch_size` 16 as its processor cuts them."""
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {
        "model_type": "siglip2",
        "text_config": {**common, "vocab_size": vocab_size, "max_position_embeddings": 64},
        "vision_config": {**common, "patch_size": patch_size, "num_patches": 16},
    }


@pytest.fixture(scope="session")
def tiny_siglip_config_path(tmp_path_factory) -> str:
    import json

    path = tmp_path_factory.mktemp("model") / "siglip-test.json"
    path.write_text(json.dumps(tiny_siglip_values()))
    return str(path)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    """A small demo catalogue in the Indo-fashion layout (shared, read-only for tests)."""
    root = tmp_path_factory.mktemp("demo") / "indo-fashion-demo"
    write_demo_dataset(root, num_train=192, num_val=45, num_test=45, image_size=48, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def shared_titles_demo_dir(tmp_path_factory) -> str:
    """`demo_dir`'s catalogue with 30 % of the items sharing a title with another photo of the same product."""
    root = tmp_path_factory.mktemp("demo-shared") / "indo-fashion-demo"
    write_demo_dataset(root, num_train=192, num_val=45, num_test=45, image_size=48, seed=0, shared_titles=0.3)
    return str(root)


@pytest.fixture(scope="session")
def tiny_model_config_path(tmp_path_factory) -> str:
    """A CLIPConfig JSON for --scratch_config (vocab size and special ids are set from the offline tokenizer)."""
    path = tmp_path_factory.mktemp("model") / "clip-test.json"
    path.write_text(tiny_clip_config().to_json_string())
    return str(path)


@pytest.fixture(scope="session")
def offline_tokenizer():
    captions = [
        "Women's red striped cotton kurta with gold border",
        "Men's black checked sherwani, maroon trim",
        "Blue polka dot silk saree for women with silver border by Kesar Lane",
    ]
    return build_offline_tokenizer(captions * 2)


@pytest.fixture
def make_configs(demo_dir, tiny_model_config_path, tmp_path):
    """Configs for a quick from-scratch demo run; keyword arguments override any field."""

    def build(**overrides) -> tuple[DataConfig, ModelConfig, TrainConfig]:
        values = {
            "data_dir": demo_dir,
            "cache_dir": str(tmp_path / "cache"),
            "scratch_config": tiny_model_config_path,
            "output_dir": str(tmp_path / "out"),
            "num_train_epochs": 2,
            "per_device_train_batch_size": 32,
            "per_device_eval_batch_size": 32,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "seed": 0,
        }
        values.update(overrides)
        split = {
            cls: {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
            for cls in (DataConfig, ModelConfig, TrainConfig)
        }
        return DataConfig(**split[DataConfig]), ModelConfig(**split[ModelConfig]), TrainConfig(**split[TrainConfig])

    return build


def with_fresh_state(function, *args, **kwargs):
    """`function(*args, **kwargs)`, then Accelerate's process state reset: each train, evaluate or embed call builds
    its own Accelerator, whose settings the next one in this test process must not inherit."""
    from accelerate.state import AcceleratorState

    try:
        return function(*args, **kwargs)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def train_on_demo(root, demo_dir: str, model: ModelConfig, output: str = "out", **train):
    """`clip-accel train` (train_and_publish) on the demo catalogue into ROOT/OUTPUT, caching in ROOT/cache; returns
    the (data, model, train) configs and the TrainingResult."""
    from clip_accel.cli import train_and_publish

    configs = (
        DataConfig(data_dir=demo_dir, cache_dir=str(root / "cache")),
        model,
        TrainConfig(output_dir=str(root / output), **train),
    )
    return configs, with_fresh_state(train_and_publish, *configs)


@pytest.fixture(scope="session")
def tiny_pretrained_dir(tmp_path_factory, demo_dir, tiny_model_config_path) -> str:
    """A `from_pretrained` folder to fine-tune from (LoRA, WiSE-FT): a tiny model trained 2 epochs from scratch on
    the demo catalogue, with its processor."""
    root = tmp_path_factory.mktemp("pretrained")
    model = ModelConfig(scratch_config=tiny_model_config_path)
    schedule = {"num_train_epochs": 2, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 32}
    train_on_demo(root, demo_dir, model, "model", **schedule, learning_rate=2e-3, seed=0, eval_initial_model=False)
    return str(root / "model")


CLIP_BENCHMARK = "clip-benchmark==1.6.2"


@pytest.fixture(scope="session")
def clip_benchmark(tmp_path_factory):
    """clip-benchmark's `metrics` package (zeroshot_retrieval, zeroshot_classification), installed without its
    dependencies (it pulls a torchvision that does not load beside torch's CPU build)."""
    import subprocess

    target = tmp_path_factory.mktemp("clip-benchmark")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), CLIP_BENCHMARK]
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip(f"{CLIP_BENCHMARK} could not be installed (no package index?)")
    sys.path.insert(0, str(target))
    import clip_benchmark.metrics.zeroshot_retrieval  # noqa: F401 (zeroshot_classification needs scikit-learn)

    return clip_benchmark.metrics


class EmbeddedForClipBenchmark:
    """clip-benchmark's model interface over embeddings already made: images are their embeddings, and a text is
    the index (as a string) of its row in `texts`."""

    def __init__(self, texts):
        self.texts = texts

    def encode_image(self, images):
        return images

    def encode_text(self, rows):
        return self.texts[rows]

    def tokenize(self, captions: list[str]):
        import torch

        return torch.tensor([int(caption) for caption in captions])


def user_error(capsys, command, argv: list[str]) -> str:
    """Run a `clip_accel.cli` command that must stop on a user error: its one line on stderr (status 2, no
    traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        command(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in error, error
    return error.splitlines()[-1]


def score_demo_test_split(model_dir: str, data_dir: str, cache_dir: str, before_scoring=None):
    """(the scores `evaluation.score` gives the test split of the Indo-fashion-layout `data_dir` with the model
    folder `model_dir`, embedded in batches of 8; the split), `before_scoring(clip)` run first (a hook to add)."""
    from accelerate import Accelerator

    from clip_accel import evaluation
    from clip_accel.model import ContrastiveModel, image_layout, load_pretrained

    def score():
        accelerator = Accelerator(cpu=True)
        clip, processor = load_pretrained(model_dir)
        model = ContrastiveModel(clip)
        data = DataConfig(data_dir=data_dir, cache_dir=cache_dir)
        layout = image_layout(clip, processor)
        split = evaluation.evaluation_splits(accelerator, data, processor, layout, 8, family=model.family)["test"]
        if before_scoring is not None:
            before_scoring(clip)
        return evaluation.score(accelerator, accelerator.prepare(model), processor, split), split

    return with_fresh_state(score)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_dir) -> str:
    """The demo catalogue as shards: 4 training shards of 48 rows, one validation and one test shard."""
    from clip_accel.data import write_webdataset_shards

    shards = str(tmp_path_factory.mktemp("demo-shards"))
    for split in ("train", "val", "test"):
        write_webdataset_shards(demo_dir, shards, split, rows_per_shard=48)
    return shards
