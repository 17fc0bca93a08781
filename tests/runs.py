"""Helpers of the data-set runner tests (tests/data/): a model wrapper that watches or interrupts
a run, test images, and the comparison of two stores. Importable as ``runs`` (tests/ is on the
path), also by the subprocesses of the command-line tests (``--loader runs:load_slow``)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
from PIL import Image

import clipdecomp
from clipdecomp.data.store import StoreReader

FIELDS = ("embedding", "heads", "mlps", "cls_to_cls", "ok", "error", "paths", "labels")
SUMS = ("n", "sum_outer", "head_sum", "mlp_sum", "cls_sum", "embedding_sum")


class Probe:
    """A model wrapper: records the threads that preprocess, counts model calls, can sleep in
    each call (``delay``) or raise KeyboardInterrupt at call ``stop_at`` (a Ctrl-C)."""

    def __init__(self, model, delay: float = 0.0, stop_at: int | None = None):
        self.model = model
        self.config = model.config
        self.path = model.path
        self.delay = delay
        self.stop_at = stop_at
        self.threads_seen: set[str] = set()
        self.calls = 0

    def preprocess(self, images):
        self.threads_seen.add(threading.current_thread().name)
        return self.model.preprocess(images)

    def decompose(self, pixels, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        if self.delay:
            time.sleep(self.delay)
        return self.model.decompose(pixels, **kwargs)


def load_slow(path, **kwargs):
    """ModelSpec loader for the command line: the real model, slowed by $PROBE_DELAY s a call."""
    return Probe(clipdecomp.load(path, **kwargs), delay=float(os.environ.get("PROBE_DELAY", "0")))


def checkpoint(ck, dtype="F32") -> str:
    """The open_clip-layout weights file of a tests/checkpoints.py checkpoint."""
    return ck.file("open_clip", dtype)


def write_images(root, n, seed=0, fmt_cycle=("png", "jpg")):
    """n small 64x64 RGB images (smooth colour gradients plus noise), in two sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i in range(n):
        sub = os.path.join(root, f"part{i % 2}")
        os.makedirs(sub, exist_ok=True)
        c = rng.uniform(size=(3, 3))
        img = c[:, 0] * yy[..., None] + c[:, 1] * xx[..., None] + c[:, 2] * 0.3
        img = np.clip(img + rng.normal(scale=0.05, size=img.shape), 0, 1)
        ext = fmt_cycle[i % len(fmt_cycle)]
        p = os.path.join(sub, f"img{i:04d}.{ext}")
        Image.fromarray((img * 255).astype(np.uint8)).save(p, quality=95)
        paths.append(p)
    return paths


def assert_same_store(a: StoreReader, b: StoreReader) -> None:
    assert a.complete and b.complete
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f)[:], getattr(b, f)[:], err_msg=f)
    sa, sb = a.stats, b.stats
    for f in SUMS:
        np.testing.assert_allclose(getattr(sa, f), getattr(sb, f), rtol=1e-12, atol=0,
                                   err_msg=f)
