"""model.fit step time: optgen.keras.Optimizer("keras/adamw") against keras.optimizers.AdamW.

    python tools/keras_fit_bench.py [--width 768] [--blocks 4] [--batch 16] [--steps 10] \
        [--repeats 15]

The model is a transformer-sized stack of Dense layers (per block: Dense(4 * width, gelu),
Dense(width), LayerNormalization, as a transformer's MLP block). Both optimizers train the
same model from the same weights on the same data; each is warmed up (compiled) first, then
timed in alternation, one ``model.fit`` of ``--steps`` steps per timing. A step time is a
timing divided by its steps; the ratio is the median of the per-repeat ratios
(optgen / Keras, lower is faster), printed with the range of the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import optgen  # noqa: E402  (first: it sets XLA:CPU's fusion option before JAX starts)

HYPERS = {"learning_rate": 1e-4, "weight_decay": 0.01}


def build(width: int, blocks: int, optimizer) -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((width,))]
    for _ in range(blocks):
        layers += [
            keras.layers.Dense(4 * width, activation="gelu"),
            keras.layers.Dense(width),
            keras.layers.LayerNormalization(),
        ]
    model = keras.Sequential(layers)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch * args.steps, args.width)).astype("float32")
    y = rng.normal(size=x.shape).astype("float32")
    models = {
        "keras": build(args.width, args.blocks, keras.optimizers.AdamW(**HYPERS)),
        "optgen": build(args.width, args.blocks, optgen.keras.Optimizer("keras/adamw", **HYPERS)),
    }
    params = models["keras"].count_params()
    for model in models.values():  # compile both before timing
        model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    ratios = [o / k for o, k in zip(times["optgen"], times["keras"], strict=True)]
    print(
        f"{params:,} parameters, {args.blocks} blocks of width {args.width}, batch {args.batch}, "
        f"{args.steps} steps per timing, {args.repeats} repeats, keras {keras.__version__} on "
        f"{keras.backend.backend()}"
    )
    for name, values in times.items():
        print(
            f"  {name:7s} {statistics.median(values):8.2f} ms per step (median; "
            f"{min(values):.2f}-{max(values):.2f})"
        )
    print(
        f"  optgen / keras step time: {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
