"""Run by tests/test_tfm.py in a fresh process: TF Model Garden's AdamWeightDecay on given numbers.

    python tfm_reference.py INPUTS.npz CASES.json OUTPUTS.npz

INPUTS holds ``names`` (the parameters' key paths), ``param/I`` and ``grad/STEP/I`` (float32);
CASES maps a case name to AdamWeightDecay's constructor arguments. Writes ``CASE/I``, each
parameter after every step, and ``defaults`` (the constructor's defaults as JSON). TensorFlow
runs alone here, away from the test process's JAX.
"""

import importlib.util
import inspect
import json
import sys

import numpy as np
import tensorflow as tf


def load_legacy_adamw():
    # By file: the package's __init__ imports its optimizer factory, which needs gin.
    import official

    path = official.__path__[0] + "/modeling/optimization/legacy_adamw.py"
    spec = importlib.util.spec_from_file_location("legacy_adamw", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(inputs_path, cases_path, out_path):
    inputs = np.load(inputs_path)
    names = [str(n) for n in inputs["names"]]
    steps = len({f.split("/")[1] for f in inputs.files if f.startswith("grad/")})
    cls = load_legacy_adamw().AdamWeightDecay
    out = {}
    for case, settings in json.loads(open(cases_path).read()).items():
        variables = [tf.Variable(inputs[f"param/{i}"], name=name) for i, name in enumerate(names)]
        opt = cls(**settings)

        @tf.function
        def apply(grads):  # traced and run in this iteration only
            opt.apply_gradients(zip(grads, variables, strict=True))  # noqa: B023

        for step in range(steps):
            apply([tf.constant(inputs[f"grad/{step}/{i}"]) for i in range(len(names))])
        out |= {f"{case}/{i}": v.numpy() for i, v in enumerate(variables)}
    signature = inspect.signature(cls.__init__).parameters
    defaults = {
        k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty
    }
    out["defaults"] = np.array(json.dumps({k: v for k, v in defaults.items() if k != "name"}))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
