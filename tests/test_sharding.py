"""optgen on meshes, as a JAX user meets them (8 host devices, in a fresh process): Explicit and
Auto axes, sharded and replicated parameters, data parallel, ZeRO-1, shard_map and an orbax
restore onto another topology — each with optax's numbers (tests/scripts/mesh_citizen.py)."""

from __future__ import annotations

import pytest
from conftest import run_device_script


@pytest.fixture(scope="module")
def report():
    report = run_device_script("mesh_citizen.py", timeout=600)
    assert report.pop("devices") == 8
    return report


def spec(text: str) -> str:
    """A PartitionSpec's text with trailing Nones dropped: P(None,) and P() lay out alike."""
    inner = text[2:-1].rstrip(", ").split(", ") if text != "P()" else []
    while inner and inner[-1] in ("None", ""):
        inner.pop()
    return f"P({', '.join(inner)})"


SHARDED = [
    "explicit_sharded",
    "explicit_sharded_step",
    "auto_sharded",
    "explicit_replicated",
    "auto_replicated_step",
]


@pytest.mark.parametrize("scenario", SHARDED)
def test_training_on_a_mesh_gives_optax_numbers_and_keeps_layouts(report, scenario):
    result = report[scenario]
    assert "error" not in result, result
    assert result["diff"] < 1e-6
    want = {k: spec(v) for k, v in result["expected"].items()}
    for key in ("params", "state_init", "state"):  # state laid out like its parameter from init on
        assert {k: spec(v) for k, v in result[key].items()} == want, (key, result)


def test_zero1_updates_state_shards_and_gathers_params_once(report):
    result = report["zero1"]
    assert "error" not in result, result
    assert result["diff"] < 1e-6
    assert {k: spec(v) for k, v in result["params"].items()} == {"w": "P()", "b": "P()"}
    assert {k: spec(v) for k, v in result["state"].items()} == {"w": "P('data')", "b": "P('data')"}
    assert result["collectives"] == ["all-gather"]
    assert result["update_rows_per_device"] == 2  # 16 rows of w over 8 devices


@pytest.mark.parametrize("scenario", ["shard_map", "orbax"])
def test_shard_map_and_orbax_restore_onto_eight_devices(report, scenario):
    result = report[scenario]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert "error" not in result, result
    assert result["diff"] < 1e-6
    if scenario == "orbax":
        assert {k: spec(v) for k, v in result["state"].items()} == {"w": "P('data')", "b": "P()"}
