"""``CLIP``: a loaded model, its preprocessing and tokenizer, and the decomposition.

Create one with :func:`clipdecomp.load`. Shapes: B images, T texts, S image side, C context
length, D embedding dim, L layers, H heads, N tokens.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ModelConfig
from .decomposition import Decomposition
from .preprocess import _is_float_array, as_image_list, preprocess, preprocess_items
from .tokenizer import Tokenizer

__all__ = ["CLIP", "default_threads"]

#: images per forward pass when nothing else is asked
_BATCH = 8
#: bytes of per-token terms one spatial batch may hold before the batch is made smaller
_SPATIAL_BATCH_BYTES = 512 * 2**20


def default_threads() -> int:
    """Threads for the C core: ``OMP_NUM_THREADS`` when set, else ``os.cpu_count()``.

    Examples
    --------
    >>> default_threads() >= 1
    True
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env.split(",")[0])
            if n > 0:
                return n
        except ValueError:
            pass
    return max(1, os.cpu_count() or 1)


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, np.float32(1e-12))).astype(np.float32)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc=desc)


class CLIP:
    """A CLIP ViT model over the clipdecomp C core.

    Attributes
    ----------
    config : ModelConfig
        Geometry, activation and preprocessing.
    tokenizer : Tokenizer or None
        The text tokenizer (None when the model has no text tower or no vocabulary was found).
    logit_scale : float or None
        ``exp(logit_scale)`` of the checkpoint (about 100 for released models), if it has one.
    path : str
        The weights file.
    threads : int
        Threads the C core uses (default :func:`default_threads`).
    act_source : str
        Where the activation came from (the ``act=`` argument, the config, the pretrained table,
        or open_clip's default).

    Examples
    --------
    >>> import clipdecomp
    >>> model = clipdecomp.load("ViT-B-16", pretrained="openai")          # doctest: +SKIP
    >>> img = model.encode_image(["cat.jpg"])                             # doctest: +SKIP
    >>> txt = model.encode_text(["a photo of a cat", "a photo of a dog"]) # doctest: +SKIP
    >>> (model.logit_scale * img @ txt.T).argmax(1)                       # doctest: +SKIP
    array([0])
    """

    def __init__(self, core: Any, config: ModelConfig, tokenizer: Tokenizer | None = None,
                 logit_scale: float | None = None, path: str = "",
                 threads: int | None = None, act_source: str = ""):
        self._core = core
        self.config = config
        self.tokenizer = tokenizer
        self.logit_scale = logit_scale
        self.path = path
        self.act_source = act_source
        self.threads = threads

    # -- properties ----------------------------------------------------------------------------

    @property
    def threads(self) -> int:
        """Threads for the C core."""
        return self._threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        if value is None:
            value = default_threads()
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"threads must be a positive int, got {value!r}")
        self._threads = int(value)

    @property
    def layout(self) -> str:
        """The weights' key layout: ``"open_clip"`` or ``"hf"``."""
        return str(getattr(self._core, "layout", ""))

    # -- preprocessing -------------------------------------------------------------------------

    def preprocess(self, images: Any) -> np.ndarray:
        """Images -> normalised float32 pixels ``[B, 3, S, S]``.

        Parameters
        ----------
        images : path, PIL.Image, uint8 array, float array, or a list of these
            See :func:`clipdecomp.preprocess.preprocess`.

        Examples
        --------
        >>> model.preprocess(["cat.jpg", "dog.png"]).shape              # doctest: +SKIP
        (2, 3, 224, 224)
        """
        c = self.config
        return preprocess(images, c.image_size, c.mean, c.std, c.resize_mode, c.interpolation)

    def tokenize(self, texts: str | Sequence[str],
                 context_length: int | None = None) -> np.ndarray:
        """Texts -> int32 ids ``[T, C]`` (open_clip's layout: start, tokens, end, zeros).

        Examples
        --------
        >>> model.tokenize(["a dog"])[0, :4]                              # doctest: +SKIP
        array([49406,   320,  1929, 49407], dtype=int32)
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json / vocab.json + "
                             "merges.txt beside the weights, and no text tower to use the "
                             "bundled CLIP vocabulary for); pass tokenizer= to clipdecomp.load")
        return self.tokenizer(texts, context_length or self.config.context_length)

    # -- running -------------------------------------------------------------------------------

    def _batches(self, images: Any, batch_size: int):
        """Yield ``(start, pixels [b, 3, S, S])`` over the input, preprocessing per batch."""
        if _is_float_array(images):
            px = self.preprocess(images)
            for s in range(0, px.shape[0], batch_size):
                yield s, px[s:s + batch_size]
            return
        items = as_image_list(images)
        if not items:
            raise ValueError("no images given (an empty list)")
        c = self.config
        listed = isinstance(images, (list, tuple))
        for s in range(0, len(items), batch_size):
            yield s, preprocess_items(items[s:s + batch_size], c.image_size, c.mean, c.std,
                                      c.resize_mode, c.interpolation, start=s, listed=listed)

    @staticmethod
    def _count(images: Any) -> int:
        if _is_float_array(images):
            a = np.asarray(images)
            return a.shape[0] if a.ndim == 4 else 1
        return len(as_image_list(images))

    def _run(self, pixels: np.ndarray, **opts: Any) -> dict[str, np.ndarray]:
        return self._core.encode_image(np.ascontiguousarray(pixels, dtype=np.float32),
                                       threads=self.threads, **opts)

    def encode_image(self, images: Any, normalize: bool = True,
                     batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Image embeddings, float32 ``[B, D]``.

        Parameters
        ----------
        images : path, PIL.Image, array, or a list of these
            Raw images are preprocessed; float ``[B, 3, S, S]`` arrays are used as they are.
        normalize : bool
            Divide each embedding by its norm (default True, like open_clip's
            ``encode_image(x, normalize=True)``).
        batch_size : int, optional
            Images per forward pass (default 8).
        progress : bool
            Show a progress bar.

        Examples
        --------
        >>> model.encode_image(["cat.jpg"]).shape                         # doctest: +SKIP
        (1, 512)
        """
        bs = int(batch_size or _BATCH)
        n = self._count(images)
        out = np.empty((n, self.config.embed_dim), dtype=np.float32)
        with _progress(n, progress, "encode_image") as bar:
            for s, px in self._batches(images, bs):
                out[s:s + px.shape[0]] = self._run(px)["embedding"]
                bar.update(px.shape[0])
        return _normalize(out) if normalize else out

    def _as_ids(self, texts_or_ids: Any) -> np.ndarray:
        if isinstance(texts_or_ids, str) or (
                isinstance(texts_or_ids, (list, tuple)) and texts_or_ids
                and all(isinstance(t, str) for t in texts_or_ids)):
            return self.tokenize(texts_or_ids)
        ids = np.asarray(texts_or_ids)
        if ids.ndim == 1 and ids.size and np.issubdtype(ids.dtype, np.integer):
            ids = ids[None]
        c = self.config
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"texts must be strings, or integer token ids [T, "
                             f"{c.context_length}]; got {ids.dtype} of shape {ids.shape}")
        if ids.shape[1] != c.context_length:
            raise ValueError(f"token ids must have the model's context length "
                             f"{c.context_length}; got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}); got "
                             f"[{ids.min()}, {ids.max()}]")
        return np.ascontiguousarray(ids, dtype=np.int32)

    def encode_text(self, texts_or_ids: Any, normalize: bool = True,
                    batch_size: int | None = None) -> np.ndarray:
        """Text embeddings, float32 ``[T, D]``.

        Parameters
        ----------
        texts_or_ids : str, list of str, or int array ``[T, C]``
            Texts are tokenized; ids are used as they are (the feature is read at the position
            of each row's largest id, the end-of-text token).
        normalize : bool
            Divide each embedding by its norm (default True).
        batch_size : int, optional
            Texts per forward pass (default 256).

        Examples
        --------
        >>> model.encode_text(["a photo of a cat"]).shape                 # doctest: +SKIP
        (1, 512)
        """
        if not self.config.has_text:
            raise ValueError("this checkpoint has no text tower: encode_text is not available")
        ids = self._as_ids(texts_or_ids)
        bs = int(batch_size or 256)
        out = np.empty((ids.shape[0], self.config.embed_dim), dtype=np.float32)
        for s in range(0, ids.shape[0], bs):
            out[s:s + bs] = self._core.encode_text(ids[s:s + bs], threads=self.threads)
        return _normalize(out) if normalize else out

    # -- the decomposition ---------------------------------------------------------------------

    def _spatial_batch(self) -> int:
        c = self.config
        per_image = c.layers * c.n_tokens * c.heads * c.embed_dim * 4
        return int(max(1, min(_BATCH, _SPATIAL_BATCH_BYTES // max(per_image, 1))))

    def decompose(self, images: Any, spatial: bool = False, attn: bool = False,
                  batch_size: int | None = None, progress: bool = False,
                  keep_pixels: bool = True) -> Decomposition:
        """Decompose image embeddings into heads, tokens and MLPs (Gandelsman et al., 2024).

        Parameters
        ----------
        images : path, PIL.Image, array, or a list of these
            B images (raw, or preprocessed float ``[B, 3, S, S]``).
        spatial : bool
            Also keep the per (token, head) terms ``tokens [B, L, N, H, D]``: L * N * H * D
            floats per image (58 MiB for ViT-B/16), for heat maps and segmentation.
        attn : bool
            Also keep the attention maps ``attn_cls [B, L, H, N]`` and ``attn_mean
            [B, L, N, N]``.
        batch_size : int, optional
            Images per forward pass: default 8, fewer with ``spatial=True`` (at most
            512 MiB of tokens per batch).
        progress : bool
            Show a tqdm progress bar.
        keep_pixels : bool
            Keep the preprocessed pixels in the result (float32 ``[B, 3, S, S]``), so that
            ``probe`` can re-run the model without ``spatial=True``.

        Returns
        -------
        Decomposition

        Examples
        --------
        >>> dec = model.decompose(["cat.jpg"], spatial=True)              # doctest: +SKIP
        >>> dec.tokens.shape                                              # doctest: +SKIP
        (1, 12, 197, 12, 512)
        """
        c = self.config
        bs = int(batch_size or (self._spatial_batch() if spatial else _BATCH))
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self._count(images)
        shapes = {
            "embedding": (c.embed_dim,), "ln_stats": (3,),
            "heads": (c.layers, c.heads, c.embed_dim), "mlps": (c.layers + 1, c.embed_dim),
            "cls_to_cls": (c.layers, c.embed_dim),
        }
        if spatial:
            shapes["tokens"] = (c.layers, c.n_tokens, c.heads, c.embed_dim)
        if attn:
            shapes["attn_cls"] = (c.layers, c.heads, c.n_tokens)
            shapes["attn_mean"] = (c.layers, c.n_tokens, c.n_tokens)
        if keep_pixels:
            shapes["pixels"] = (3, c.image_size, c.image_size)
        out = {k: np.empty((n,) + s, dtype=np.float32) for k, s in shapes.items()}
        with _progress(n, progress, "decompose") as bar:
            for s, px in self._batches(images, bs):
                r = self._run(px, heads=True, mlps=True, cls_to_cls=True, tokens=spatial,
                              attn=attn)
                e = s + px.shape[0]
                for k in shapes:
                    if k == "pixels":
                        out[k][s:e] = px
                    else:
                        out[k][s:e] = r[k]
                bar.update(px.shape[0])
        return Decomposition(config=c, embedding=out["embedding"], ln_stats=out["ln_stats"],
                             heads=out["heads"], mlps=out["mlps"], cls_to_cls=out["cls_to_cls"],
                             tokens=out.get("tokens"), attn_cls=out.get("attn_cls"),
                             attn_mean=out.get("attn_mean"), pixels=out.get("pixels"),
                             model=self)

    def _probe(self, pixels: np.ndarray, directions: np.ndarray,
               batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Token scores ``[B, L, N, H, T]`` of preprocessed pixels along ``directions [T, D]``."""
        c = self.config
        t = directions.shape[0]
        n = pixels.shape[0]
        per_image = c.layers * c.n_tokens * c.heads * t * 4
        bs = int(batch_size or max(1, min(_BATCH, _SPATIAL_BATCH_BYTES // max(per_image, 1))))
        out = np.empty((n, c.layers, c.n_tokens, c.heads, t), dtype=np.float32)
        with _progress(n, progress, "probe") as bar:
            for s in range(0, n, bs):
                px = pixels[s:s + bs]
                out[s:s + px.shape[0]] = self._run(px, probe=directions)["probe"]
                bar.update(px.shape[0])
        return out

    def __repr__(self) -> str:
        c = self.config
        lines = [
            f"CLIP {c.name or os.path.basename(self.path)} ({self.layout or '?'} layout)",
            (f"  image: {c.image_size}px, patch {c.patch_size} (N={c.n_tokens} tokens), "
            f"width {c.width}, {c.layers} layers, {c.heads} heads, mlp {c.mlp_dim}, "
            f"act {c.act}{f' ({self.act_source})' if self.act_source else ''}"),
            (f"  embedding dim {c.embed_dim}; preprocess: {c.resize_mode} {c.interpolation}, "
            f"mean {tuple(round(m, 4) for m in c.mean)}, std {tuple(round(s, 4) for s in c.std)}"),
        ]
        if c.has_text:
            lines.append(f"  text: width {c.text_width}, {c.text_layers} layers, {c.text_heads} "
                         f"heads, context {c.context_length}, vocab {c.vocab_size}")
        else:
            lines.append("  text: none")
        if self.logit_scale is not None:
            lines.append(f"  logit_scale {self.logit_scale:.2f}")
        lines.append(f"  threads {self.threads}; weights {self.path}")
        return "\n".join(lines)

