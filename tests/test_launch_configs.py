"""Every accelerate config in accelerate_configs/ loads with Accelerate's own loader, so none rots."""

from __future__ import annotations

import dataclasses
import glob

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

CONFIGS = sorted(glob.glob("accelerate_configs/*.yaml"))
EXPECTED = {
    "cpu": "NO",
    "single_gpu": "NO",
    "multi_gpu": "MULTI_GPU",
    "multi_node": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
}


def test_all_documented_configs_exist():
    assert {path.split("/")[-1].removesuffix(".yaml") for path in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_with_only_known_keys(path):
    config = load_config_from_file(path)
    name = path.split("/")[-1].removesuffix(".yaml")
    assert config.distributed_type.value == EXPECTED[name]
    known = {field.name for field in dataclasses.fields(ClusterConfig)}
    with open(path) as handle:
        assert set(yaml.safe_load(handle)) <= known
