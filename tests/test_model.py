"""Model loading, freezing strategies and on-device normalisation."""

from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import tiny_clip_config, with_fresh_state
from PIL import Image
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Siglip2TextModel,
    Siglip2VisionModel,
    SiglipTextModel,
    SiglipVisionModel,
    pipeline,
)

from clip_accel.best_model import save_model
from clip_accel.config import ModelConfig, TrainConfig
from clip_accel.data.preprocess import load_rgb_image
from clip_accel.loss import contrastive_loss
from clip_accel.model import (
    ContrastiveModel,
    PixelNormalizer,
    family_of,
    freeze_parameters,
    load_model_and_processor,
)
from clip_accel.optim import build_optimizer
from clip_accel.search import QueryEncoder
from clip_accel.zero_shot import embed_texts

CAPTIONS = ["red striped kurta", "blue silk saree", "black checked sherwani", "green plain dupatta"]


def _train_steps(model: CLIPModel, steps: int = 3) -> None:
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-2, weight_decay=0.1))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pixels = torch.randn(4, 3, 32, 32, generator=generator)
        input_ids = torch.randint(0, 500, (4, 6), generator=generator)
        input_ids[:, -1] = 2  # the config's eos id
        out = model(input_ids=input_ids, pixel_values=pixels)
        contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("strategy", ["none", "vision_layers", "backbones"])
def test_frozen_parameters_stay_bit_identical_and_trainable_ones_move(strategy):
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    trainable, total = freeze_parameters(model, strategy, vision_layers=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train_steps(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) and total >= trainable > 0
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, before[name]), f"{name} is frozen but changed"
        else:
            assert not torch.equal(parameter, before[name]), f"{name} should train"
    expectations = {
        "none": lambda: not frozen,
        "vision_layers": lambda: (
            "vision_model.encoder.layers.0.mlp.fc1.weight" in frozen
            and "vision_model.embeddings.patch_embedding.weight" in frozen
            and "vision_model.encoder.layers.1.mlp.fc1.weight" not in frozen
            and not any("text" in n for n in frozen)
        ),
        "backbones": lambda: (
            {n for n, _ in model.named_parameters()} - frozen
            == {
                "logit_scale",
                "visual_projection.weight",
                "text_projection.weight",
                "vision_model.post_layernorm.weight",
                "vision_model.post_layernorm.bias",
                "text_model.final_layer_norm.weight",
                "text_model.final_layer_norm.bias",
            }
        ),
    }
    assert expectations[strategy]()


def test_freezing_more_layers_than_exist_says_so():
    with pytest.raises(ValueError, match="exceeds the 2 vision layers"):
        freeze_parameters(CLIPModel(tiny_clip_config()), "vision_layers", vision_layers=3)


def test_weight_decay_skips_biases_norms_and_logit_scale():
    model = ContrastiveModel(CLIPModel(tiny_clip_config()))  # what the trainer optimizes
    decay_group, no_decay_group = build_optimizer(model, TrainConfig(weight_decay=0.2)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    assert decay_group["weight_decay"] == 0.2 and no_decay_group["weight_decay"] == 0.0
    assert "logit_scale" in no_decay and "clip.text_model.final_layer_norm.weight" in no_decay
    assert all(names[id(p)].endswith("weight") for p in decay_group["params"])


def test_from_scratch_model_matches_its_offline_tokenizer(tiny_model_config_path):
    model, processor = load_model_and_processor(ModelConfig(scratch_config=tiny_model_config_path), lambda: CAPTIONS)
    tokenizer = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert processor.image_processor.crop_size["height"] == model.config.vision_config.image_size == 32


def test_bundled_preset_loads_and_unknown_preset_lists_the_choices():
    model, _ = load_model_and_processor(ModelConfig(scratch_config="clip-tiny"), lambda: CAPTIONS)
    assert model.config.vision_config.image_size == 64
    with pytest.raises(ValueError, match="clip-tiny"):
        load_model_and_processor(ModelConfig(scratch_config="clip-huge"), lambda: CAPTIONS)


def test_cached_uint8_plus_device_normalisation_matches_the_clip_image_processor(tmp_path):
    # Users run CLIPProcessor at inference: training must see the same pixels (PNG here; the JPEG case below).
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 9, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 120 x 90
    path = tmp_path / "photo.png"
    Image.fromarray(smooth).save(path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(Image.open(path), return_tensors="pt")["pixel_values"]
    cached = torch.from_numpy(load_rgb_image(str(path), 32).copy())[None]
    ours = PixelNormalizer(processor.image_mean, processor.image_std)(cached)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_evaluation_pixels_of_a_large_jpeg_are_exactly_the_clip_image_processors(tmp_path):
    # A photo over twice the model's resolution: libjpeg's draft decode would downscale it while decoding. The
    # evaluation path decodes in full and gives CLIPProcessor's pixels; the training path's draft decode does not.
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (40, 30, 3)).astype(np.float32)
    photo = np.kron(coarse, np.ones((20, 20, 1)))[:, :, :] + rng.normal(0, 12, (800, 600, 3))
    path = tmp_path / "large.jpeg"
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(path, quality=92)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    expected = processor(Image.open(path), return_tensors="pt")["pixel_values"]
    normalise = PixelNormalizer(processor.image_mean, processor.image_std)

    def pixels(draft: bool) -> torch.Tensor:
        return normalise(torch.from_numpy(load_rgb_image(str(path), 64, draft=draft).copy())[None])

    torch.testing.assert_close(pixels(draft=False), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(pixels(draft=True), expected, atol=1e-5, rtol=0)


# Saved folders in every client (issue 40): the per-tower classes, the zero-shot pipeline and sentence-transformers
# compute from a folder the trainer saved what the trainer computes. One folder per bundled preset, and one per
# family fine-tuned from a folder written as clip_accel wrote them before (or another tool may).
PRESETS = sorted(path.name.removesuffix(".json") for path in (resources.files("clip_accel") / "presets").iterdir())
STARTS = [*PRESETS, *(f"{preset} from a pretrained folder" for preset in ("clip-tiny", "siglip-tiny", "siglip2-tiny"))]
# Of different lengths: padded to the longest, the shorter ones are not padded as SigLIP was trained.
TEXTS = ["a red kurta", "a blue silk saree with a silver border and gold buttons", "black checked sherwani"]
TOWER_CLASSES = {  # each family's loading classes but its own (model_class) and AutoModel
    "clip": (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPTextModel, CLIPTextModelWithProjection),
    "siglip": (SiglipVisionModel, SiglipTextModel),
    "siglip2": (Siglip2VisionModel, Siglip2TextModel),
}


def _as_written_before_issue_40(folder) -> None:
    """Turn a folder written by plain `save_pretrained` (no sentence-transformers files) into one as clip_accel
    wrote them before issue 40: CLIP's sub-configs at transformers' default projection_dim (512), a tokenizer that
    returns an attention mask."""
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "clip":
        config["text_config"]["projection_dim"] = config["vision_config"]["projection_dim"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("model_input_names", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module", params=STARTS)
def saved_folder(request, tmp_path_factory):
    """A folder saved as the trainer saves its best model (`best_model.save_model`), its PNG photos (of several
    shapes), and the trainer's text embeddings of TEXTS in memory before saving. SigLIP's logit bias is set to 0
    so that the scores spread (at -10 every sigmoid score is ~5e-5)."""
    root = tmp_path_factory.mktemp("saved")
    preset = request.param.split(" ")[0]
    clip, processor = load_model_and_processor(ModelConfig(scratch_config=preset), lambda: CAPTIONS)
    if family_of(clip.config).sigmoid:
        with torch.no_grad():
            clip.logit_bias.zero_()
    if "pretrained" in request.param:
        clip.save_pretrained(root / "pretrained")
        processor.save_pretrained(root / "pretrained")
        _as_written_before_issue_40(root / "pretrained")
        pretrained = ModelConfig(model_name_or_path=str(root / "pretrained"))
        clip, processor = load_model_and_processor(pretrained, lambda: CAPTIONS)
    module = ContrastiveModel(clip).eval()
    with torch.no_grad():
        text_embeds = embed_texts(module, processor.tokenizer, TEXTS, torch.device("cpu"))
    with_fresh_state(save_model, Accelerator(cpu=True), module, processor, str(root / "model"))
    rng = np.random.default_rng(0)
    photos = []
    for index, (height, width) in enumerate([(48, 48), (40, 72), (90, 30)]):
        pixels = np.kron(rng.integers(0, 256, (height // 6, width // 6, 3)), np.ones((6, 6, 1))).astype(np.uint8)
        photos.append(str(root / f"photo-{index}.png"))
        Image.fromarray(pixels).save(photos[-1])
    return SimpleNamespace(folder=str(root / "model"), photos=photos, text_embeds=F.normalize(text_embeds, dim=-1))


@pytest.fixture(scope="module")
def trainer_embeddings(saved_folder):
    """What the trainer's code computes from the saved folder (`load_pretrained`, its pixels and text padding):
    L2-normalised image and text embeddings, and the scores of each photo against each of TEXTS."""
    encoder = QueryEncoder(saved_folder.folder, torch.device("cpu"))
    with torch.no_grad():
        image_embeds, text_embeds = encoder.images(saved_folder.photos), encoder.texts(TEXTS)
        logits = encoder.model.logit_scale.exp() * image_embeds @ text_embeds.T
        if encoder.model.family.sigmoid:
            scores = torch.sigmoid(logits + encoder.model.logit_bias)
        else:
            scores = logits.softmax(dim=-1)
    return SimpleNamespace(image_embeds=image_embeds, text_embeds=text_embeds, scores=scores)


def test_the_trainer_reads_the_saved_folder_as_it_held_it(saved_folder, trainer_embeddings):
    torch.testing.assert_close(trainer_embeddings.text_embeds, saved_folder.text_embeds, rtol=0, atol=1e-6)


def test_every_loading_class_reads_the_saved_folder_and_computes_its_tower(saved_folder):
    # transformers refuses a folder whose weights do not fit the class's config (issue 40: CLIP's projections).
    processor = AutoProcessor.from_pretrained(saved_folder.folder)
    model = AutoModel.from_pretrained(saved_folder.folder)
    family = family_of(model.config)
    assert type(model) is family.model_class
    images = [Image.open(photo) for photo in saved_folder.photos]
    image_inputs = dict(processor(images=images, return_tensors="pt"))
    padding = {"padding": "max_length", "max_length": family.pad_to} if family.pad_to else {"padding": True}
    text_inputs = dict(processor(text=TEXTS, return_tensors="pt", truncation=True, **padding))
    with torch.no_grad():
        expected = {
            "image": model.get_image_features(**image_inputs).pooler_output,
            "text": model.get_text_features(**text_inputs).pooler_output,
        }
    for model_class in TOWER_CLASSES[family.name]:
        tower, loading = model_class.from_pretrained(saved_folder.folder, output_loading_info=True)
        assert not loading["missing_keys"] and not loading["mismatched_keys"], (model_class.__name__, loading)
        side = "image" if "Vision" in model_class.__name__ else "text"
        with torch.no_grad():
            output = tower(**(image_inputs if side == "image" else text_inputs))
        if family.name == "clip" and not model_class.__name__.endswith("WithProjection"):
            continue  # the tower without its projection: no embedding to compare
        embeds = getattr(output, f"{side}_embeds", None) if family.name == "clip" else output.pooler_output
        torch.testing.assert_close(embeds, expected[side], rtol=1e-4, atol=1e-5, msg=model_class.__name__)


def test_the_zero_shot_pipeline_scores_as_the_trainer(saved_folder, trainer_embeddings):
    classifier = pipeline("zero-shot-image-classification", model=saved_folder.folder, device="cpu")
    results = classifier(saved_folder.photos, candidate_labels=TEXTS, hypothesis_template="{}")
    scores = torch.tensor([[{r["label"]: r["score"] for r in result}[text] for text in TEXTS] for result in results])
    torch.testing.assert_close(scores, trainer_embeddings.scores, rtol=1e-4, atol=1e-5)


def test_sentence_transformers_embeds_as_the_trainer(saved_folder, trainer_embeddings):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(saved_folder.folder, device="cpu")
    texts = model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    images = [Image.open(photo) for photo in saved_folder.photos]
    photos = model.encode(images, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(texts, trainer_embeddings.text_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(photos, trainer_embeddings.image_embeds, rtol=1e-4, atol=1e-5)
