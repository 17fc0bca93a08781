"""clipdecomp: CLIP image embeddings decomposed into heads, tokens and MLPs."""
__version__ = "0.1.0"

import importlib as _importlib

# Assembled while the package is being built up: each piece is imported when present.
_EXPORTS = {
    "loading": ["load", "list_pretrained"],
    "model": ["CLIP"],
    "decomposition": ["Decomposition"],
    "config": ["ModelConfig"],
}
for _mod, _names in _EXPORTS.items():
    try:
        _m = _importlib.import_module(f".{_mod}", __name__)
    except ImportError as _e:  # pragma: no cover - transitional
        if _e.name is None or not _e.name.startswith(__name__):
            raise
        continue
    for _n in _names:
        if hasattr(_m, _n):
            globals()[_n] = getattr(_m, _n)
