"""tools/bench.py's table and tools/plot_bench.py's figure, on made-up results (no timing here)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

TOOLS = pathlib.Path(__file__).parent.parent / "tools"


def load_tool(name: str):
    sys.path.insert(0, str(TOOLS))  # bench.py imports plot_bench from beside it
    try:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(TOOLS))


def made_up_runs():
    """Two processes of two workloads; torchao ran only the first, torch skipped the second."""

    def run(scale):
        return [
            {
                "workload": "single",
                "title": "one tensor",
                "leaves": 1,
                "elements": 16,
                "times_ms": {
                    "optgen": [1.0 * scale, 1.1 * scale],
                    "optax": [2.0, 2.0],
                    "torchao-8bit": [40.0, 44.0],
                },
                "skipped": {"bnb-8bit": "ImportError: No module named 'bitsandbytes'"},
            },
            {
                "workload": "bf16-mu",
                "title": "bf16 first moment",
                "leaves": 2,
                "elements": 32,
                "times_ms": {"optgen": [3.0, 3.0], "optax": [6.0 * scale, 6.0]},
                "skipped": {"torch-fused": "no separate moment dtype"},
            },
        ]

    return [run(1.0), run(1.2)]


def test_the_table_gives_ratios_and_says_what_was_skipped_and_where():
    bench = load_tool("bench")
    runs = made_up_runs()
    summaries = [bench.summarize([process[i] for process in runs]) for i in range(2)]
    # optgen/torchao per repeat: 1/40, 1.1/44 in the first process; 1.2/40, 1.32/44 in the second
    ratio = summaries[0]["ratios"]["torchao-8bit"]
    assert ratio["per_process"] == pytest.approx([0.025, 0.03])
    text = bench.table(summaries)
    assert "| single | 1 | 16 |" in text and "| - |" in text  # torchao sits bf16-mu out
    assert "bnb-8bit skipped (single): ImportError" in text
    assert "torch-fused skipped (bf16-mu): no separate moment dtype" in text


def test_the_plot_is_written(tmp_path):
    pytest.importorskip(
        "matplotlib", reason="matplotlib is not installed (pip install -e '.[bench]')"
    )
    bench, plot_bench = load_tool("bench"), load_tool("plot_bench")
    runs = made_up_runs()
    summaries = [bench.summarize([process[i] for process in runs]) for i in range(2)]
    path = tmp_path / "bench.png"
    plot_bench.plot(summaries, runs, "a made-up machine", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("key", ["bf16", "bf16-mu"])
def test_mixed_workloads_pair_optgen_with_its_float32_step(key, monkeypatch, tmp_path):
    # issue 14's targets for the mixes are against optgen's own all-f32 step, in the same run
    bench = load_tool("bench")
    title, _, dtype, state_dtype, options = bench.WORKLOADS[key]
    monkeypatch.setitem(bench.WORKLOADS, key, (title, [(8, 4), (5,)], dtype, state_dtype, options))
    monkeypatch.setattr(bench, "torch", None)
    specs = {
        "f32-state": tmp_path / "f32_state.spec",
        "bf16-mu": tmp_path / "bf16_mu.spec",
    }
    specs["f32-state"].write_text(bench._ADAMW_F32_STATE)
    specs["bf16-mu"].write_text(bench._ADAMW_BF16_MU)
    run = bench.bench_workload(
        key, {k: str(v) for k, v in specs.items()}, repeats=1, block=1, progress=print
    )
    assert list(run["times_ms"]) == ["optgen", "optax", "optgen-f32"]
    f32 = bench._f32_runner([(5,)])
    assert f32.params["w0000"].dtype == f32.state.slots["nu"]["w0000"].dtype == "float32"
