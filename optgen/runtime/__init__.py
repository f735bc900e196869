"""The runtime: what :func:`optgen.load` returns and everything a training loop touches.

Imports run one way: ``load`` and ``checkpoint`` -> ``optimizer`` -> (``validate``,
``packing``, ``placement``, ``config``, ``serialization``) -> ``state``.
"""
