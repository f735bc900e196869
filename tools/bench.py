"""Benchmark an optgen step against optax and PyTorch's optimizers, interleaved in one process.

    python tools/bench.py                       # every workload, AdamW, 3 processes
    python tools/bench.py --workloads single --repeats 15 --processes 5 --json out.json
    python tools/bench.py --optimizer muon --workloads transformer --repeats 3 --block 1

With ``--optimizer muon``: optgen's ``muon`` against ``optax.contrib.muon`` (both Muon on the
2-d leaves and AdamW on the rest) and ``torch.optim.Muon`` on the 2-d leaves beside a fused
``torch.optim.AdamW`` on the rest (torch's Newton-Schulz runs in bfloat16). With
``--optimizer muon-bf16``, optgen's Newton-Schulz runs in bfloat16 as torch's does
(``bf16_newton_schulz``: MKL's bfloat16 GEMM where the ``mkl`` wheel is installed).

Each repeat runs a short block of steps of every implementation in turn, so machine
noise falls on all of them alike. The whole run is repeated in fresh processes, because
where the buffers land in memory is drawn once per process and moves the times. The
table gives the median time per step over all blocks and, for each ratio, the median and
quartiles of the per-repeat ratios and each process's median ratio.

On the 16M single tensor, the 8-bit AdamWs of torchao and bitsandbytes and DeepSpeed's
CPUAdam run beside torch's fused AdamW (:data:`EXTRA_REFERENCES`). Every PyTorch reference
is optional (``pip install -e '.[bench]'``); one that is absent or cannot step on this
machine is skipped, and the table says why. ``--plot FILE.png`` draws the times
(tools/plot_bench.py)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch's idle OpenMP threads must not spin against XLA's
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from optgen.codegen import fusion  # noqa: E402

import optgen  # noqa: E402  (before any JAX computation: it sets XLA:CPU's fusion option)

try:
    import torch  # noqa: E402
except ImportError:
    torch = None

HYPERS = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
MUON_HYPERS = dict(learning_rate=1e-3)  # and optax.contrib.muon's defaults

# bf16 parameters with float32 state: the built-in AdamW with its states' storage dtype declared.
_ADAMW = (Path(__file__).resolve().parents[1] / "kernels" / "adamw.spec").read_text()
_ADAMW_F32_STATE = _ADAMW.replace("state mu = 0", "state mu: f32 = 0").replace(
    "state nu = 0", "state nu: f32 = 0"
)
# float32 parameters with a bf16 first moment: what optax.adamw(mu_dtype=jnp.bfloat16) keeps.
_ADAMW_BF16_MU = _ADAMW.replace("state mu = 0", "state mu: bf16 = 0")


def transformer_shapes(
    layers: int = 6, width: int = 512, vocab: int = 16000
) -> list[tuple[int, ...]]:
    """Leaf shapes of a small decoder-only transformer: 75 leaves, ~27M elements."""
    shapes = [(vocab, width)]
    for _ in range(layers):
        shapes += [
            (width,),
            (width,),
            (width, 3 * width),
            (3 * width,),
            (width, width),
            (width,),
            (width,),
            (width,),
            (width, 4 * width),
            (4 * width,),
            (4 * width, width),
            (width,),
        ]
    return shapes + [(width,), (width,)]


def small_shapes(count: int = 2000) -> list[tuple[int, ...]]:
    """Biases and norm scales: many small 1-d leaves."""
    rng = np.random.default_rng(0)
    return [(int(n),) for n in rng.choice([64, 128, 256, 512, 768, 1024], size=count)]


# name: (title, leaf shapes, parameter dtype, state dtype, optgen.load keywords)
WORKLOADS = {
    "single": ("one 16M-element f32 tensor", [(16 * 1024 * 1024,)], np.float32, np.float32, {}),
    "transformer": (
        "~80 transformer leaves, f32",
        transformer_shapes(),
        np.float32,
        np.float32,
        {},
    ),
    "small": ("2,000 small leaves, f32", small_shapes(), np.float32, np.float32, {}),
    # the same leaves with their state packed into flat buffers (optgen.load(..., pack=True))
    "small-packed": (
        "2,000 small leaves, f32, pack=True",
        small_shapes(),
        np.float32,
        np.float32,
        {"pack": True},
    ),
    "bf16": (
        "transformer leaves, bf16 params, f32 state",
        transformer_shapes(),
        jnp.bfloat16,
        np.float32,
        {},
    ),
    # torch's fused AdamW keeps its state in the parameters' dtype: this compares like with like.
    "bf16-state": (
        "transformer leaves, bf16 params and state",
        transformer_shapes(),
        jnp.bfloat16,
        jnp.bfloat16,
        {},
    ),
    # optgen.load(..., stochastic_rounding=True) against torchao's
    # AdamW(bf16_stochastic_round=True); optax and torch's fused AdamW round to nearest (they
    # have no such option): for scale only.
    "bf16-sr": (
        "transformer leaves, bf16 params and state, stochastic rounding",
        transformer_shapes(),
        jnp.bfloat16,
        jnp.bfloat16,
        {"stochastic_rounding": True},
    ),
    # optgen.load(..., kahan_sum=True) against the same step without it (optgen-nearest) and
    # torch-optimi's AdamW(kahan_sum=True); optax and torch's fused AdamW round to nearest.
    "bf16-kahan": (
        "transformer leaves, bf16 params and state, Kahan-compensated params",
        transformer_shapes(),
        jnp.bfloat16,
        jnp.bfloat16,
        {"kahan_sum": True},
    ),
    # optax's mu_dtype; torch's fused AdamW has no such option, so it sits this one out.
    "bf16-mu": (
        "transformer leaves, f32 params, bf16 first moment",
        transformer_shapes(),
        np.float32,
        jnp.bfloat16,
        {},
    ),
    # 8-bit AdamW (kernels/adamw8bit.spec) against optgen's and torch's float32 AdamW and the
    # 8-bit AdamWs of torchao and bitsandbytes (optional: pip install torchao bitsandbytes).
    "8bit": (
        "one 16M-element f32 tensor, 8-bit AdamW",
        [(16 * 1024 * 1024,)],
        np.float32,
        np.int8,
        {},
    ),
}


def make_tree(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return {
        f"w{i:04d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
        for i, s in enumerate(shapes)
    }


class OptgenRunner:
    name = "optgen"

    def __init__(self, params, grads, spec, hypers=HYPERS, **options):
        self.opt = optgen.load(spec, **hypers, **options)
        self.params, self.grads = jax.tree.map(jnp.copy, params), grads
        self.state = self.opt.init(self.params)

    def run(self, steps):
        for _ in range(steps):
            self.params, self.state = self.opt.step(self.params, self.grads, self.state)
        jax.block_until_ready(self.params)


class OptaxRunner:
    name = "optax"

    def __init__(self, params, grads, mu_dtype=None, opt=None):
        opt = opt or optax.adamw(
            HYPERS["learning_rate"],
            HYPERS["b1"],
            HYPERS["b2"],
            HYPERS["eps"],
            weight_decay=HYPERS["weight_decay"],
            mu_dtype=mu_dtype,
        )

        def step(p, g, s):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        self.step = jax.jit(step, donate_argnums=(0, 2))
        self.params, self.grads = jax.tree.map(jnp.copy, params), grads
        self.state = opt.init(self.params)

    def run(self, steps):
        for _ in range(steps):
            self.params, self.state = self.step(self.params, self.grads, self.state)
        jax.block_until_ready(self.params)


def _torch_tensor(x):
    return torch.from_numpy(np.array(x.astype(jnp.float32))).to(
        torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
    )


def _torch_adamw_hypers() -> dict:
    return dict(
        lr=HYPERS["learning_rate"],
        betas=(HYPERS["b1"], HYPERS["b2"]),
        eps=HYPERS["eps"],
        weight_decay=HYPERS["weight_decay"],
    )


class TorchRunner:
    """A PyTorch optimizer (``make(parameters)`` builds it) over copies of the parameters."""

    def __init__(self, name, params, grads, make):
        self.name = name
        self.params = [torch.nn.Parameter(_torch_tensor(p)) for p in params.values()]
        for p, g in zip(self.params, grads.values(), strict=True):
            p.grad = _torch_tensor(g)
        self.opts = make(self.params)

    def run(self, steps):
        for _ in range(steps):
            for opt in self.opts:
                opt.step()


def _torch_fused(params):
    return [torch.optim.AdamW(params, **_torch_adamw_hypers(), fused=True)]


def _torch_muon(params):
    """Muon on the 2-d leaves (weight decay 0, optax.contrib.muon's default), AdamW on the rest."""
    matrices = [p for p in params if p.ndim == 2]
    rest = [p for p in params if p.ndim != 2]
    return [
        torch.optim.AdamW(rest, **_torch_adamw_hypers(), fused=True),
        torch.optim.Muon(matrices, lr=MUON_HYPERS["learning_rate"], weight_decay=0.0),
    ]


def _torchao_8bit(params):
    from torchao.optim import AdamW8bit  # block-wise 8-bit moments (dynamic code), torch.compile

    return [AdamW8bit(params, **_torch_adamw_hypers())]


def _bnb_8bit(params):
    import bitsandbytes  # block-wise 8-bit moments (dynamic code), its CPU backend here

    return [bitsandbytes.optim.AdamW8bit(params, **_torch_adamw_hypers())]


def _torchao_stochastic(params):
    # torchao 0.18 exports its full-precision AdamW under this name
    from torchao.optim import (
        _AdamW,
    )

    return [_AdamW(params, **_torch_adamw_hypers(), bf16_stochastic_round=True)]


def _optimi_kahan(params):
    import optimi  # torch-optimi: its compensation in bf16 beside each bf16 parameter

    return [optimi.AdamW(params, **_torch_adamw_hypers(), kahan_sum=True)]


def _deepspeed_cpu_adam(params):
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # its C++ op, built on first use (ninja)

    return [DeepSpeedCPUAdam(params, **_torch_adamw_hypers(), adamw_mode=True)]


# PyTorch references beside optgen and optax: name -> what builds the optimizer.
TORCH_REFERENCES = {
    "torch-fused": _torch_fused,
    "torchao-8bit": _torchao_8bit,
    "bnb-8bit": _bnb_8bit,
    "deepspeed-cpuadam": _deepspeed_cpu_adam,
    "torchao-sr": _torchao_stochastic,
    "optimi-kahan": _optimi_kahan,
}
# Which references each workload runs besides torch-fused (which runs wherever its state's dtype
# can be the workload's). The 8-bit and CPU-Adam libraries run the 16M single tensor, as in
# issue 14, and beside optgen's adamw8bit.
EXTRA_REFERENCES = {
    "single": ("torchao-8bit", "bnb-8bit", "deepspeed-cpuadam"),
    "8bit": ("torchao-8bit", "bnb-8bit"),
    "bf16-sr": ("torchao-sr",),
    "bf16-kahan": ("optimi-kahan",),
}


def torch_runners(key, params, grads, optimizer) -> tuple[list, dict[str, str]]:
    """The PyTorch runners of workload ``key``, and the reason each one left out was skipped."""
    if torch is None:
        return [], {"torch": "torch is not installed (pip install -e '.[bench]'), or --no-torch"}
    if key == "bf16-mu":
        return [], {"torch-fused": "torch's AdamW keeps its moments in the parameters' dtype"}
    if optimizer.startswith("muon"):
        return [TorchRunner("torch", params, grads, _torch_muon)], {}
    runners, skipped = [], {}
    for name in ("torch-fused", *EXTRA_REFERENCES.get(key, ())):
        try:
            runner = TorchRunner(name, params, grads, TORCH_REFERENCES[name])
            runner.run(1)  # a library that imports but cannot step here is skipped too
            runners.append(runner)
        except Exception as err:  # an optional library absent or unusable here: say why
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return runners, skipped


def xla_lowering(leaves: int, uniform: bool) -> str:
    """The lowering ``auto`` takes where optgen's own CPU loop cannot run (codegen/fusion.py)."""
    return "per-output" if uniform and leaves <= fusion.PER_OUTPUT_MAX_LEAVES else "shared"


def _f32_runner(shapes) -> OptgenRunner:
    """optgen's AdamW with float32 parameters and state on ``shapes``, paired with a mixed or
    8-bit step in every repeat (its own buffers: a bf16 workload's are another dtype)."""
    f32 = OptgenRunner(make_tree(shapes, np.float32, 0), make_tree(shapes, np.float32, 1), "adamw")
    f32.name = "optgen-f32"
    return f32


def bench_workload(key, specs, repeats, block, progress, optimizer="adamw", compare_xla=False):
    title, shapes, dtype, state_dtype, options = WORKLOADS[key]
    params, grads = make_tree(shapes, dtype, 0), make_tree(shapes, dtype, 1)
    mixed = np.dtype(state_dtype) != np.dtype(dtype)
    if key == "8bit":
        # optgen's adamw8bit first (every ratio is against it), then its float32 AdamW
        runners = [OptgenRunner(params, grads, "adamw8bit"), _f32_runner(shapes)]
    elif optimizer.startswith("muon"):
        hypers = MUON_HYPERS | {"bf16_newton_schulz": optimizer == "muon-bf16"}
        runners = [
            OptgenRunner(params, grads, "muon", hypers, **options),
            OptaxRunner(params, grads, opt=optax.contrib.muon(**MUON_HYPERS)),
        ]
    else:
        spec = specs["bf16-mu" if key == "bf16-mu" else "f32-state"] if mixed else "adamw"
        runners = [
            OptgenRunner(params, grads, spec, **options),
            OptaxRunner(params, grads, mu_dtype=state_dtype if mixed else None),
        ]
        if options.get("kahan_sum"):  # what the compensation costs, paired per repeat
            nearest = OptgenRunner(params, grads, spec)
            nearest.name = "optgen-nearest"
            runners.append(nearest)
        if key in ("bf16", "bf16-mu"):  # issue 14's targets: against optgen's all-f32 step
            runners.append(_f32_runner(shapes))
        if compare_xla:
            xla = OptgenRunner(
                params, grads, spec, lowering=xla_lowering(len(shapes), not mixed), **options
            )
            xla.name = "optgen-xla"
            runners.append(xla)
    references, skipped = torch_runners(key, params, grads, optimizer)
    runners += references
    for runner in runners:  # compile and warm up
        runner.run(2)
    times = {r.name: [] for r in runners}
    for rep in range(repeats):
        for runner in runners:
            progress(f"{key}: repeat {rep + 1}/{repeats}, {runner.name}")
            start = time.perf_counter()
            runner.run(block)
            times[runner.name].append(1e3 * (time.perf_counter() - start) / block)
    elements = sum(int(np.prod(s)) for s in shapes)
    return {
        "workload": key,
        "title": title,
        "leaves": len(shapes),
        "elements": elements,
        "times_ms": times,
        "skipped": skipped,
    }


def summarize(runs: list[dict]) -> dict:
    """One workload's runs (one per process) in one row: pooled medians and paired ratios.

    Each ratio pairs the blocks of one repeat: blocks run side by side share the machine's
    state of the moment, so pairing cancels slow drifts that a ratio of medians keeps. Where
    the buffers land in memory is drawn once per process (before optgen/placement.py it moved
    optgen's single-tensor step by up to 1.8x, see docs/fusion.md), so each process's own
    median ratio is listed too.
    """
    names = list(runs[0]["times_ms"])
    pooled = {n: [t for run in runs for t in run["times_ms"][n]] for n in names}
    ratios = {}
    for other in names[1:]:
        per_repeat = [
            np.asarray(run["times_ms"]["optgen"]) / np.asarray(run["times_ms"][other])
            for run in runs
        ]
        q1, median, q3 = np.percentile(np.concatenate(per_repeat), [25, 50, 75])
        ratios[other] = {
            "median": float(median),
            "q1": float(q1),
            "q3": float(q3),
            "per_process": [float(np.median(r)) for r in per_repeat],
        }
    return {k: runs[0][k] for k in ("workload", "title", "leaves", "elements")} | {
        "median_ms": {n: float(np.median(t)) for n, t in pooled.items()},
        "ratios": ratios,
        "skipped": runs[0].get("skipped", {}),
    }


def table(summaries) -> str:
    # torch sits some workloads out
    names = list(dict.fromkeys(n for r in summaries for n in r["median_ms"]))
    head = [
        "workload",
        "leaves",
        "elements",
        *[f"{n} ms" for n in names],
        *[f"optgen/{n}" for n in names[1:]],
    ]
    rows = [head, ["---"] * len(head)]
    for r in summaries:
        times = [f"{r['median_ms'][n]:.2f}" if n in r["median_ms"] else "-" for n in names]
        ratios = [_ratio(r["ratios"][n]) if n in r["ratios"] else "-" for n in names[1:]]
        rows.append([r["workload"], str(r["leaves"]), f"{r['elements']:,}", *times, *ratios])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in summaries:
        for name, why in r.get("skipped", {}).items():
            skipped.setdefault((name, why), []).append(r["workload"])
    lines += [f"\n{name} skipped ({', '.join(w)}): {why}" for (name, why), w in skipped.items()]
    return "\n".join(lines)


def _ratio(q: dict) -> str:
    per_process = q["per_process"]
    return f"{q['median']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})" + (
        "; per process " + ", ".join(f"{x:.2f}" for x in per_process)
        if len(per_process) > 1
        else ""
    )


def run_here(keys, repeats, block, optimizer, compare_xla) -> list[dict]:
    """Every workload in this process."""

    def progress(text):
        if sys.stderr.isatty():
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            "f32-state": Path(tmp) / "adamw_f32_state.spec",
            "bf16-mu": Path(tmp) / "adamw_bf16_mu.spec",
        }
        specs["f32-state"].write_text(_ADAMW_F32_STATE)
        specs["bf16-mu"].write_text(_ADAMW_BF16_MU)
        runs = [
            bench_workload(
                k,
                {name: str(path) for name, path in specs.items()},
                repeats,
                block,
                progress,
                optimizer,
                compare_xla,
            )
            for k in keys
        ]
    progress("")
    return runs


def run_in_processes(
    keys, repeats, block, processes, optimizer, compare_xla, no_torch=False
) -> list[list[dict]]:
    """Every workload in each of ``processes`` fresh processes, one after another."""
    per_process = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            out = Path(tmp) / f"run{i}.json"
            if sys.stderr.isatty():
                print(f"\r\033[Kprocess {i + 1}/{processes}", file=sys.stderr)
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--workloads",
                    ",".join(keys),
                    "--repeats",
                    str(repeats),
                    "--block",
                    str(block),
                    "--processes",
                    "1",
                    "--optimizer",
                    optimizer,
                    "--json",
                    str(out),
                ]
                + ["--compare-xla"] * compare_xla
                + ["--no-torch"] * no_torch,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            per_process.append(json.loads(out.read_text())["runs"][0])
    return per_process


def describe_machine() -> str:
    """The CPU, its cores and the versions of what the bench compares."""
    versions = [f"jax {jax.__version__}", f"optax {optax.__version__}"]
    for package in ("torch", "torchao", "bitsandbytes", "deepspeed"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{_cpu_name()}, {os.cpu_count()} cores, " + ", ".join(versions)


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    lines = text.splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if "model name" in line]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    # the same name covers CPUs of several generations: say which vector units it has
    isa = [name for flag, name in _ISA if flag in flags][-1:]
    return (names[0] if names else platform.machine()) + "".join(f" ({unit})" for unit in isa)


_ISA = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_bf16", "AMX"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS)
    )
    parser.add_argument(
        "--repeats", type=int, default=9, help="blocks per implementation (median over these)"
    )
    parser.add_argument("--block", type=int, default=5, help="steps per block")
    parser.add_argument(
        "--processes",
        type=int,
        default=3,
        help="fresh processes to repeat the whole run in (each draws its own buffer placement)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "muon", "muon-bf16"),
        default="adamw",
        help="muon-bf16: optgen's muon with bf16_newton_schulz (torch's numerics; GEMM library)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--plot",
        type=Path,
        help="also draw them here (a PNG; needs matplotlib, tools/plot_bench.py)",
    )
    parser.add_argument(
        "--compare-xla",
        action="store_true",
        help="also run optgen with XLA's fused loops instead of its own CPU loop (optgen-xla)",
    )
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help="leave PyTorch out (its bf16 Muon takes minutes a step where the CPU lacks bf16)",
    )
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.workloads.split(",")]
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown:
        parser.error(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}"
        )
    if args.processes < 1 or args.repeats < 1 or args.block < 1:
        parser.error("--processes, --repeats and --block must be at least 1")

    if args.no_torch:
        global torch
        torch = None
    if args.processes > 1:
        per_process = run_in_processes(
            keys,
            args.repeats,
            args.block,
            args.processes,
            args.optimizer,
            args.compare_xla,
            args.no_torch,
        )
    else:
        per_process = [run_here(keys, args.repeats, args.block, args.optimizer, args.compare_xla)]
    summaries = [summarize([runs[i] for runs in per_process]) for i in range(len(keys))]
    machine = describe_machine()
    kind = "AdamW" if args.optimizer == "adamw" else args.optimizer
    print(
        f"{kind} step, {args.processes} process(es) x {args.repeats} blocks of {args.block} "
        f"steps ({machine}).\n"
        "Times: medians over all blocks. Ratios: median (quartiles) of the per-repeat ratios, "
        "then each process's median\n"
    )
    print(table(summaries))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "summaries": summaries, "runs": per_process}, indent=2)
        )
    if args.plot:
        from plot_bench import plot  # beside this file: python puts tools/ first on sys.path

        plot(summaries, per_process, machine, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
