"""Layer-wise learning-rate decay: every parameter's rate as timm's table gives it per tower, the weight-decay split
kept, the top rate logged, bad values and LoRA refused at start-up, and a resumed run bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_clip_config, tiny_siglip2_values, tiny_siglip_values, with_fresh_state
from transformers import CLIPModel, Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

from clip_accel.config import TrainConfig
from clip_accel.model import ContrastiveModel, enable_gradient_checkpointing, freeze_parameters
from clip_accel.optim import build_optimizer

# Exponents of D by parameter prefix, for a vision tower of 3 layers and a text tower of 2 (L + 1 = 4 and 3).
BY_HAND = {
    "clip.vision_model.embeddings.": 4,
    "clip.vision_model.pre_layrnorm.": 4,
    "clip.vision_model.encoder.layers.0.": 3,
    "clip.vision_model.encoder.layers.1.": 2,
    "clip.vision_model.encoder.layers.2.": 1,
    "clip.vision_model.post_layernorm.": 0,
    "clip.vision_model.head.": 0,  # (SigLIP's pooling head)
    "clip.visual_projection.": 0,
    "clip.text_model.embeddings.": 3,
    "clip.text_model.encoder.layers.0.": 2,
    "clip.text_model.encoder.layers.1.": 1,
    "clip.text_model.final_layer_norm.": 0,
    "clip.text_model.head.": 0,  # (SigLIP's)
    "clip.text_projection.": 0,
    "logit_scale": 0,
    "logit_bias": 0,
}


def _model(family: str) -> ContrastiveModel:
    if family == "clip":
        config = tiny_clip_config()
        config.vision_config.num_hidden_layers = 3
        return ContrastiveModel(CLIPModel(config))
    make = tiny_siglip_values if family == "siglip" else tiny_siglip2_values
    values = {k: v for k, v in make().items() if k != "model_type"}
    values["vision_config"] = {**values["vision_config"], "num_hidden_layers": 3}
    if family == "siglip":
        return ContrastiveModel(SiglipModel(SiglipConfig(**values)))
    return ContrastiveModel(Siglip2Model(Siglip2Config(**values)))


def _rates(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {
        names[id(parameter)]: (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for parameter in group["params"]
    }


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
@pytest.mark.parametrize("freeze", ["none", "vision_layers", "backbones"])
def test_every_parameter_trains_at_the_rate_of_timms_table_per_tower(family, freeze):
    model = _model(family)
    if freeze != "none":
        freeze_parameters(model.clip, freeze, 1)  # (vision_layers: the embeddings and the first vision layer)
    if freeze == "vision_layers":
        enable_gradient_checkpointing(model.clip)  # (no parameter renamed)
    config = TrainConfig(learning_rate=1e-3, weight_decay=0.2, layer_decay=0.5)
    rates = _rates(build_optimizer(model, config), model)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(rates) == trainable and (freeze == "none" or len(trainable) < len(list(model.parameters())))
    for name, (lr, weight_decay) in rates.items():
        exponent = next(power for prefix, power in BY_HAND.items() if name.startswith(prefix))
        assert lr == pytest.approx(1e-3 * 0.5**exponent, rel=1e-12), name
        parameter = dict(model.named_parameters())[name]
        assert weight_decay == (0.2 if parameter.ndim >= 2 and name != "logit_scale" else 0.0), name
    plain = build_optimizer(model, TrainConfig(learning_rate=1e-3, weight_decay=0.2))
    assert [group["weight_decay"] for group in plain.param_groups] == [0.2, 0.0]  # (off: the two groups)
    assert {lr for lr, _ in _rates(plain, model).values()} == {1e-3}


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_a_layer_decay_outside_zero_to_one_is_refused(value):
    with pytest.raises(ValueError, match=r"--layer_decay must be in \(0, 1\]"):
        TrainConfig(layer_decay=value)


def test_layer_decay_with_lora_stops_at_start_up_with_the_reason(make_configs, tiny_pretrained_dir):
    from clip_accel.trainer import train

    configs = make_configs(model_name_or_path=tiny_pretrained_dir, scratch_config=None, lora_rank=4, layer_decay=0.7)
    with pytest.raises(ValueError, match=r"--layer_decay 0.7 with --lora_rank: LoRA freezes every layer"):
        with_fresh_state(train, *configs)


def test_a_layer_decay_run_logs_the_top_rate_and_resumes_bit_identically(make_configs, caplog):
    from clip_accel.trainer import train

    options = {"max_steps": 6, "checkpointing_steps": 3, "eval_steps": 6, "eval_initial_model": False}
    options |= {"layer_decay": 0.6, "lr_scheduler_type": "constant", "learning_rate": 2e-3}
    with caplog.at_level("INFO"):
        full = with_fresh_state(train, *make_configs(**options))
    groups = [record.getMessage() for record in caplog.records if "--layer_decay 0.6:" in record.getMessage()]
    assert any("lr 0.002," in line and "text 3" in line and "vision 3" in line for line in groups), groups
    assert any("lr 0.000432," in line and "vision 0" in line for line in groups), groups  # 2e-3 x 0.6^3 (L = 2)
    assert {r["learning_rate"] for r in full.history if "learning_rate" in r} == {2e-3}  # the top rate
    checkpoint = str(Path(make_configs()[2].output_dir, "checkpoints", "step-0000003"))
    resumed = with_fresh_state(train, *make_configs(**options, resume_from_checkpoint=checkpoint))
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]
    for name, weight in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
    assert full.resolved_config["layer_decay"] == 0.6  # (training_config.json)
