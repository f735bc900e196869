"""8-bit AdamW against float32 AdamW on a small real training task: loss curves and a plot.

    python tools/q8_convergence.py                 # writes docs/quantized-convergence.png
    python tools/q8_convergence.py --steps 600 --plot out.png

The task: a character-level language model (an MLP over the 8 previous bytes) trained on
the source of seven modules of Python's standard library (``CORPUS``, 0.55 MB of text that
does not change with this repository), held-out loss on the last 10%. Runs, all from one
initialization and one sequence of batches:

- optgen ``adamw`` (float32 state) and ``adamw8bit`` (q8 state, codegen/quantize.py);
- the same AdamW in jnp with its moments passed through a *linear* 8-bit block code (absmax
  per 256 elements, codes -127..127), the alternative to the power-4 code, to justify it;
- where torch is installed: ``torch.optim.AdamW`` and, where they install, torchao's and
  bitsandbytes' ``AdamW8bit`` on the same model, batches and initialization.

matplotlib is optional (``pip install -e '.[search]'``): without it no plot is drawn.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from optgen.codegen import quantize

import optgen

ROOT = Path(__file__).resolve().parents[1]
CONTEXT, EMBED, HIDDEN, VOCAB = 8, 32, 512, 128
HYPERS = dict(learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)


# Text that does not change with this repository: modules of Python's standard library.
CORPUS = ("argparse", "dataclasses", "enum", "inspect", "pathlib", "typing", "textwrap")


def corpus() -> np.ndarray:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / f"{name}.py").read_text() for name in CORPUS)
    return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % VOCAB


def windows(data: np.ndarray, starts: np.ndarray):
    x = np.stack([data[starts + k] for k in range(CONTEXT)], axis=1)
    return x, data[starts + CONTEXT]


def init(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def dense(m, n):
        return (rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)

    return {
        "embed": (0.1 * rng.standard_normal((VOCAB, EMBED))).astype(np.float32),
        "w1": dense(CONTEXT * EMBED, HIDDEN),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": dense(HIDDEN, VOCAB),
        "b2": np.zeros(VOCAB, np.float32),
    }


def loss_fn(params, x, y):
    h = params["embed"][x].reshape(x.shape[0], -1)
    h = jax.nn.gelu(h @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


def linear_roundtrip(x):
    """``x`` through a linear block code: absmax per 256, codes rint(127 x / absmax)."""
    if x.size < quantize.MIN_ELEMENTS:
        return x
    flat = jnp.pad(x.ravel(), (0, quantize.blocks(x.size) * quantize.BLOCK - x.size))
    blocks = flat.reshape(-1, quantize.BLOCK)
    scale = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    codes = jnp.round(127 * blocks / jnp.where(scale > 0, scale, 1.0))
    return (codes * scale / 127).ravel()[: x.size].reshape(x.shape)


def linear_adamw_step(params, state, grads, t):
    """AdamW whose stored moments go through :func:`linear_roundtrip` (jnp, for comparison)."""
    h = HYPERS
    mu = jax.tree.map(lambda m, g: h["b1"] * m + (1 - h["b1"]) * g, state[0], grads)
    nu = jax.tree.map(lambda v, g: h["b2"] * v + (1 - h["b2"]) * g * g, state[1], grads)

    def move(p, m, v):
        m_hat, v_hat = m / (1 - h["b1"] ** t), v / (1 - h["b2"] ** t)
        step = m_hat / (jnp.sqrt(v_hat) + h["eps"]) + h["weight_decay"] * p
        return p - h["learning_rate"] * step

    params = jax.tree.map(move, params, mu, nu)
    return params, (jax.tree.map(linear_roundtrip, mu), jax.tree.map(linear_roundtrip, nu))


def train_jax(kind: str, batches, held_out, every: int) -> list[float]:
    params = jax.tree.map(jnp.asarray, init())
    grad = jax.jit(jax.grad(loss_fn))
    evaluate = jax.jit(loss_fn)
    if kind == "linear":
        state = (jax.tree.map(jnp.zeros_like, params),) * 2
        step = jax.jit(linear_adamw_step)
    else:
        opt = optgen.load(kind, **HYPERS)
        state = opt.init(params)
    curve = []
    for t, (x, y) in enumerate(batches, start=1):
        if (t - 1) % every == 0:
            curve.append(float(evaluate(params, *held_out)))
        g = grad(params, x, y)
        if kind == "linear":
            params, state = step(params, state, g, t)
        else:
            params, state = opt.step(params, g, state)
    curve.append(float(evaluate(params, *held_out)))
    return curve


def train_torch(kind: str, batches, held_out, every: int) -> list[float]:
    import torch

    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init().items()}

    def loss(x, y):
        h = params["embed"][torch.from_numpy(x)].reshape(x.shape[0], -1)
        h = torch.nn.functional.gelu(h @ params["w1"] + params["b1"], approximate="tanh")
        logits = h @ params["w2"] + params["b2"]
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long())

    h = HYPERS
    hypers = dict(lr=h["learning_rate"], betas=(h["b1"], h["b2"]), eps=h["eps"])
    hypers["weight_decay"] = h["weight_decay"]
    if kind == "torch":
        opt = torch.optim.AdamW(params.values(), **hypers)
    elif kind == "torchao":
        from torchao.optim import AdamW8bit

        opt = AdamW8bit(params.values(), **hypers)
    else:
        from bitsandbytes.optim import AdamW8bit

        opt = AdamW8bit(params.values(), **hypers)
    curve = []
    for t, (x, y) in enumerate(batches, start=1):
        if (t - 1) % every == 0:
            with torch.no_grad():
                curve.append(float(loss(*held_out)))
        opt.zero_grad()
        loss(x, y).backward()
        opt.step()
    with torch.no_grad():
        curve.append(float(loss(*held_out)))
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--every", type=int, default=20, help="steps between held-out losses")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "quantized-convergence.png"))
    args = parser.parse_args(argv)

    data = corpus()
    split = int(0.9 * len(data))
    rng = np.random.default_rng(1)
    starts = rng.integers(0, split - CONTEXT, size=(args.steps, args.batch))
    batches = [windows(data, s) for s in starts]
    held = windows(data, np.arange(split, len(data) - CONTEXT, 7))

    runs = {}
    for kind in ("adamw", "adamw8bit", "linear"):
        runs[{"linear": "AdamW, linear 8-bit code (jnp)"}.get(kind, f"optgen {kind}")] = train_jax(
            kind, batches, held, args.every
        )
    for kind in ("torch", "torchao", "bitsandbytes"):
        try:
            name = "torch AdamW" if kind == "torch" else f"{kind} AdamW8bit"
            runs[name] = train_torch(kind, batches, held, args.every)
        except ImportError:
            pass

    print(f"| run | held-out loss at step {args.steps // 2} | at step {args.steps} |")
    print("|---|---:|---:|")
    for name, curve in runs.items():
        print(f"| {name} | {curve[len(curve) // 2]:.4f} | {curve[-1]:.4f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, (ax, diff) = plt.subplots(1, 2, figsize=(11, 4))
    base = np.asarray(runs["optgen adamw"])
    for k, (name, curve) in enumerate(runs.items()):
        steps = [min(k * args.every, args.steps) for k in range(len(curve))]
        style = dict(linestyle="--" if "torch" in name or "bits" in name else "-", color=f"C{k}")
        if np.isfinite(curve).all():
            ax.plot(steps, curve, label=name, **style)
            diff.plot(steps, np.asarray(curve) - base, label=name, **style)
        else:
            ax.plot([], [], label=f"{name}: diverged", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (nats)")
    ax.set_title("char-level MLP on Python's stdlib source")
    ax.legend(fontsize=8)
    diff.set_xlabel("step")
    diff.set_ylabel("loss minus optgen adamw's (f32 state)")
    diff.set_title("difference from float32 AdamW")
    diff.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
