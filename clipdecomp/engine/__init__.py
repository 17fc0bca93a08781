"""The engine: files and images -> arrays.

Loading (checkpoints, configs, the hub table, safetensors, tokenizers), preprocessing, the
:class:`~clipdecomp.engine.model.CLIP` forward and its
:class:`~clipdecomp.engine.decomposition.Decomposition`. The only layer that calls the C core
(through :mod:`clipdecomp.engine.core`); it imports nothing from the layers above.
"""
