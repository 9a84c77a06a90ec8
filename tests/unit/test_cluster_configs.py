"""cluster/*.yaml: Ray cluster definitions pass the checks `ray up` makes before it starts
anything (Ray's own schema, ray/autoscaler/ray-schema.json, and its config preparation), and
set up token authentication on every node."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
autoscaler = pytest.importorskip("ray.autoscaler")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["ray-cluster.yaml", "ray-onprem.yaml"]
SCHEMA = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_yaml_passes_rays_schema_and_preparation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, SCHEMA)
    for key in SCHEMA["required"]:  # cluster_name, provider
        assert key in config
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before any ssh
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cloud_cluster_has_head_cpu_and_gpu_workers():
    config = load("ray-cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert any("pip install" in c and "distnet" in c for c in config["setup_commands"])


def test_onprem_cluster_names_its_machines():
    provider = load("ray-onprem.yaml")["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]


@pytest.mark.parametrize("name", CONFIGS)
def test_token_auth_is_copied_and_exported_on_every_node(name):
    config = load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])  # ~/.bashrc
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all(
            "RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts
        ), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("provider"), "'provider' is a required property"),
        (lambda c: c.update(max_worker=3), "Additional properties are not allowed"),
        (lambda c: c["auth"].update(ssh_user=5), "is not of type 'string'"),
    ],
)
def test_the_schema_check_catches_a_broken_config(change, message):
    config = load("ray-onprem.yaml")
    change(config)
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(config, SCHEMA)
