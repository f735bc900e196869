"""``optgen.keras.Optimizer``: any spec as a Keras 3 optimizer, for ``model.compile`` and
``model.fit``.

    >>> optimizer = optgen.keras.Optimizer("keras/adamw", learning_rate=1e-3)
    >>> model.compile(optimizer=optimizer, loss="mse")

It runs on Keras's JAX backend only. ``model.fit`` calls the optimizer through
``stateless_apply``, inside the jitted train step; there :meth:`Optimizer.apply` runs the
spec's fused ``step`` (``optgen.load(spec).step``), so the update stays one jitted program.

The optimizer state is ``optgen.load(spec).init(params)``, a pytree treated as opaque:
each of its leaves is one Keras variable (after Keras's own ``iteration`` and
``learning_rate``), so ``optimizer.variables``, ``model.save`` and
``keras.models.load_model`` carry it. Keras's arguments map onto optgen's transforms
of the same names (``clipnorm``, ``use_ema``, ``gradient_accumulation_steps``, ...).
The learning rate is Keras's: a float (a variable, settable) or a
``keras.optimizers.schedules`` schedule of Keras's iteration count, evaluated each step and
given to the spec's ``learning_rate`` hyperparameter. Weight decay goes to the spec's
``weight_decay``; which variables it applies to is Keras's ``exclude_from_weight_decay``
(variables, or fragments of their names) with any ``include_in_weight_decay`` fragments
overriding it (TF Model Garden's rule), handed to optgen as a per-variable ``mask``.
"""

from __future__ import annotations

from typing import Any

import jax
import keras
from keras.src.utils.tracking import no_automatic_dependency_tracking

import optgen
from optgen.diagnostics import SpecError
from optgen.transforms.decay_mask import key_path_name, matches


@keras.saving.register_keras_serializable(package="optgen", name="Optimizer")
class Optimizer(keras.optimizers.Optimizer):
    """A Keras optimizer that runs the spec ``spec`` (a built-in name or a ``.spec`` path).

    Keyword arguments are Keras's (``learning_rate``, ``weight_decay``, ``clipnorm``, ...,
    ``exclude_from_weight_decay`` name fragments, ``name``) and the spec's own
    hyperparameters and options (``beta_1``, ``amsgrad``, ...). One step, per variable
    ``p`` with gradient ``g``, is the spec's update with ``learning_rate`` = Keras's current
    learning rate and ``g`` = the gradient after Keras's loss-scale division, accumulation
    and clip, exactly as ``optgen.load(spec, **arguments)`` computes it.
    """

    def __init__(
        self,
        spec: str = "keras/adamw",
        learning_rate=None,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        exclude_from_weight_decay=None,
        include_in_weight_decay=None,
        name=None,
        sha256=None,
        **spec_arguments: Any,
    ):
        if keras.backend.backend() != "jax":
            raise SpecError(
                "optgen.keras.Optimizer runs on Keras's JAX backend; this Keras runs on "
                f"'{keras.backend.backend()}'",
                hint="set KERAS_BACKEND=jax before keras is first imported",
                code="E370",
            )
        if "mask" in spec_arguments:
            raise SpecError(
                "optgen.keras.Optimizer takes no mask: it selects weight decay per Keras variable",
                hint="use exclude_from_weight_decay (names or "
                "optimizer.exclude_from_weight_decay(var_list=...)) and include_in_weight_decay",
                code="E372",
            )
        # a config written from a spec file: refuse the file if it changed (E349)
        if sha256 is not None:
            optgen.from_config({"spec": spec, "sha256": sha256})
        defaults = optgen.check_spec(spec).hypers
        if "learning_rate" not in defaults:
            raise SpecError(
                f"'{spec}' has no hyperparameter 'learning_rate' for Keras's learning rate",
                hint="use a spec whose step size is named learning_rate (keras/adamw, adamw, ...)",
                code="E371",
            )
        if learning_rate is None:
            learning_rate = defaults["learning_rate"]
        # Keras's own arguments that are optgen transforms of the same name.
        keras_transforms = {
            "clipnorm": clipnorm,
            "clipvalue": clipvalue,
            "global_clipnorm": global_clipnorm,
            "use_ema": use_ema,
            "ema_momentum": ema_momentum,
            "ema_overwrite_frequency": ema_overwrite_frequency,
            "loss_scale_factor": loss_scale_factor,
            "gradient_accumulation_steps": gradient_accumulation_steps,
        }
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **keras_transforms
        )
        self.spec, self.sha256 = spec, sha256
        self.include_in_weight_decay = include_in_weight_decay
        # Everything optgen.load takes but the learning rate (Keras's, given at each step) and the
        # mask (at build).
        self._arguments = dict(
            spec_arguments, **{k: v for k, v in keras_transforms.items() if v is not None}
        )
        if weight_decay is not None:
            self._arguments["weight_decay"] = weight_decay
        # errors in the arguments surface here, not at the first step
        self._optimizer = self._load()
        # what get_config writes down; build adds Keras's exclusions as a mask
        self._unmasked = self._optimizer
        if exclude_from_weight_decay:
            self.exclude_from_weight_decay(var_names=exclude_from_weight_decay)

    def _load(self, mask=None) -> optgen.Optimizer:
        return optgen.load(self.spec, **self._arguments, **({} if mask is None else {"mask": mask}))

    # As Keras's own build: the lists below are not optimizer variables.
    @no_automatic_dependency_tracking
    def build(self, variables):
        """Create the state: one Keras variable per leaf of ``optgen.load(spec).init(params)``."""
        if self.built:
            return
        variables = list(variables)
        decays = [
            matches(self.include_in_weight_decay, v.name) or self._use_weight_decay(v)
            for v in variables
        ]
        if not all(decays):
            self._optimizer = self._load(mask=decays)
        # From host copies, so the state is uncommitted as Keras's own variables are: a mix of
        # committed and uncommitted arrays made model.fit compile its train step a second time in
        # its second fit.
        state = self._optimizer.init(jax.device_get([v.value for v in variables]))
        leaves, self._state_def = jax.tree.flatten(state)
        names = [
            key_path_name(path).replace("/", "_")
            for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
        ]
        self._state_variables = []
        with keras.name_scope(self.name, caller=self):
            for leaf, leaf_name in zip(leaves, names, strict=True):
                variable = keras.Variable(
                    leaf, name=f"optgen_{leaf_name}", dtype=leaf.dtype, trainable=False
                )
                self._track_variable(variable)
                self._state_variables.append(variable)
        self._trainable_variables = variables[:]
        self._trainable_variables_indices = {self._var_key(v): i for i, v in enumerate(variables)}
        # jitted here, so optgen's donation never reaches Keras's arrays
        self._step = jax.jit(self._optimizer.step)
        self.built = True

    def apply(self, grads, trainable_variables=None):
        """One optgen step on the variables (or, in ``stateless_apply``, on the values Keras maps
        them to).
        """
        if trainable_variables is not None and not self.built:
            self.build(trainable_variables)
        if not self.built:
            raise ValueError(
                "the optimizer is not built: call optimizer.build(trainable_variables) first"
            )
        variables = self._trainable_variables
        if trainable_variables is not None:
            grads = self._in_built_order(grads, list(trainable_variables))
        state = jax.tree.unflatten(self._state_def, [v.value for v in self._state_variables])
        # Keras's learning rate (a variable, or a schedule of its iteration count) drives the
        # spec's.
        stored = state.hyperparams["learning_rate"]
        learning_rate = keras.ops.convert_to_tensor(self.learning_rate).astype(stored.dtype)
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": learning_rate})
        params, state = self._step([v.value for v in variables], list(grads), state)
        for variable, value in zip(variables, params, strict=True):
            variable.assign(value)
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
        for variable, value in zip(self._state_variables, jax.tree.leaves(state), strict=True):
            variable.assign(value)
        self._iterations.assign_add(1)

    def _in_built_order(self, grads, given: list) -> list:
        """``grads`` (one per variable of ``given``) in the order of the variables the optimizer was
        built with.
        """
        order = [self._trainable_variables_indices.get(self._var_key(v)) for v in given]
        if sorted(i for i in order if i is not None) != list(range(len(self._trainable_variables))):
            raise SpecError(
                f"apply_gradients got {len(given)} variables; this optimizer was built with "
                f"{len(self._trainable_variables)} others, and updates all of them in one step",
                hint="pass a gradient for every variable the optimizer was built with (any "
                "order), or use one optimizer per set of variables",
                code="E373",
            )
        ordered = [None] * len(order)
        for i, g in zip(order, grads, strict=True):
            ordered[i] = g
        return ordered

    def finalize_variable_values(self, var_list):
        """With ``use_ema``: the moving averages into the model's variables (as Keras does after
        ``fit``).
        """
        if not self.use_ema:
            return
        state = jax.tree.unflatten(self._state_def, [v.value for v in self._state_variables])
        for variable, value in zip(
            var_list, self._optimizer.finalize([v.value for v in var_list], state), strict=True
        ):
            # its own buffer: model.fit donates model and optimizer variables
            variable.assign(jax.numpy.copy(value))

    def get_config(self) -> dict[str, Any]:
        """Keras's config, the spec (its name, or path and SHA-256) and its hyperparameters and
        options.
        """
        spec = self._unmasked.get_config()
        hypers = {
            k: v
            for k, v in spec["hyperparameters"].items()
            if k not in ("learning_rate", "weight_decay")
        }
        # holds Keras's own transform arguments (clipnorm, use_ema, ...)
        config = super().get_config()
        # optgen's own: skip_nonfinite
        others = {k: v for k, v in spec["transforms"].items() if k not in config}
        return (
            config
            | others
            | {
                "spec": spec["spec"],
                "sha256": spec.get("sha256"),
                **hypers,
                **spec["options"],
                "exclude_from_weight_decay": self._exclude_from_weight_decay_names(),
                "include_in_weight_decay": self.include_in_weight_decay,
            }
        )

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Keras's: no weight decay on these variables, nor on those whose name matches a fragment
        (``re.search``).
        """
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        # What get_config can write down (names), and whether there is more (variables, which it
        # cannot).
        self._excluded = (bool(var_list), list(var_names) if var_names else None)

    def _exclude_from_weight_decay_names(self) -> list[str] | None:
        by_variable, var_names = getattr(self, "_excluded", (False, None))
        if by_variable:
            raise SpecError(
                "get_config cannot write down exclude_from_weight_decay(var_list=...): it holds "
                "variables",
                hint="exclude by names instead: exclude_from_weight_decay(var_names=[...])",
                code="E348",
            )
        return var_names
