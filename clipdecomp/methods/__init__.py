"""The methods: functions over :class:`~clipdecomp.engine.decomposition.Decomposition` arrays.

TextSpan (:mod:`.textspan`), streaming statistics (:mod:`.stats`), mean ablation
(:mod:`.ablation`), spatial maps (:mod:`.spatial`), zero-shot segmentation
(:mod:`.segmentation`), per-head retrieval (:mod:`.retrieval`) and zero-shot classification
(:mod:`.zeroshot`). They return arrays and tables; figures live in :mod:`clipdecomp.viz`.
Imports only the engine.
"""
