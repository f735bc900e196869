"""The runtime: what :func:`optgen.load` returns and everything a training loop touches.

Imports run one way: ``load`` -> ``optimizer`` -> (``validate``, ``packing``,
``placement``, ``config``) -> ``state``.
"""
