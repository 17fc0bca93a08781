"""TextSpan for many heads: streaming statistics vs the reference steps, in NumPy.

The setting of the paper's head tables for ViT-H/14: the 64 heads of the last four layers
(4 x 16), a pool of M = 3,500 texts, D = 1024, N = 50,000 images, 20 texts per head, rank 80.
Head terms are synthetic (each head: a random 82-dimensional subspace of R^D with decaying
scales and a mean, like a real head's d + 2 dimensional output span).

Streaming (clipdecomp): one pass of :class:`clipdecomp.methods.stats.HeadStats` over the images (the
per-head second moments, ``N D^2`` per head: float32 products over chunks of 512 images, each
chunk centred on its mean, summed into float64 accumulators by the C core; the timing includes
adding the last, partial chunk, and the first touch of the accumulators, which the scaling to N
then overstates), then :func:`textspan_from_stats` per head (independent of N). The reference:
per head, the SVD of the head's ``[N, D]`` terms and one ``[N, D] x [D, M]`` product per pick
(``replace_with_iterative_removal`` of the reference code), here in float64 NumPy on the CPU.

What is measured and what is extrapolated is written in each row: by default the statistics
pass is timed on ``--stream-images`` images and scaled linearly to N, and the reference is
timed on one head with ``--ref-picks`` picks and scaled to 20 picks and 64 heads (its cost is
exactly linear in both). ``--full`` runs the statistics pass over all N images.

    python benchmarks/bench_textspan.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clipdecomp.methods.stats import HeadStats
from clipdecomp.methods.textspan import textspan_from_stats

HEAD_RANK = 82  # d + 2 for ViT-H/14 (d = 80)


class SyntheticHeads:
    """Head terms ``[B, L, H, D]`` drawn from fixed per-head low-rank Gaussians."""

    def __init__(self, n_layers: int, n_heads: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        k = min(HEAD_RANK, dim)
        self.shape = (n_layers, n_heads, dim)
        q = rng.normal(size=(n_layers * n_heads, dim, k))
        self.basis = np.linalg.qr(q)[0].transpose(0, 2, 1).astype(np.float32)  # [LH, k, D]
        self.scales = (np.geomspace(1.0, 0.02, k)[None] * rng.uniform(0.5, 2, (len(q), 1)))
        self.scales = self.scales.astype(np.float32)  # [LH, k]
        self.means = (0.3 * rng.normal(size=(len(q), dim))).astype(np.float32)  # [LH, D]
        self.rng = np.random.default_rng(seed + 1)

    def batch(self, b: int) -> np.ndarray:
        z = self.rng.standard_normal((len(self.basis), b, self.basis.shape[1]), np.float32)
        x = np.matmul(z * self.scales[:, None], self.basis) + self.means[:, None]  # [LH, b, D]
        return x.transpose(1, 0, 2).reshape((b,) + self.shape)

    def head(self, index: int, n: int) -> np.ndarray:
        """All N terms of one head, float32 [N, D]."""
        z = self.rng.standard_normal((n, self.basis.shape[1]), np.float32)
        return (z * self.scales[index]) @ self.basis[index] + self.means[index]


def reference_head(c: np.ndarray, texts: np.ndarray, picks: int, rank: int):
    """The reference steps on one head; returns (picked indices, svd seconds, seconds/pick)."""
    t0 = time.perf_counter()
    c = np.asarray(c, np.float64)
    _, _, vh = np.linalg.svd(c, full_matrices=False)
    vh = vh[:rank]
    t = (texts @ vh.T) @ vh
    mean = c.mean(axis=0, keepdims=True)
    c = c - mean
    recon = np.repeat(mean, c.shape[0], axis=0)
    t_svd = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    n = c.shape[0]
    for _ in range(picks):
        # std over images of C T^T [N, M] (the cost of every pick), in row blocks for memory
        s1 = np.zeros(t.shape[0])
        s2 = np.zeros(t.shape[0])
        for r0 in range(0, n, 4096):
            proj = c[r0 : r0 + 4096] @ t.T
            s1 += proj.sum(axis=0)
            s2 += (proj * proj).sum(axis=0)
        j = int(np.argmax((s2 - s1 * s1 / n) / (n - 1)))
        tj = t[j].copy()
        norm2 = tj @ tj
        coef = (c @ tj / norm2)[:, None]
        recon += coef * tj
        c -= coef * tj
        t -= (t @ tj / norm2)[:, None] * tj
        out.append(j)
    return out, t_svd, (time.perf_counter() - t0) / max(picks, 1)


def run(
    n_images: int = 50_000,
    n_heads: int = 64,
    n_pool: int = 3_500,
    dim: int = 1024,
    n_texts: int = 20,
    rank: int = 80,
    stream_images: int | None = 2_000,
    ref_picks: int = 2,
    batch: int = 500,
    seed: int = 0,
) -> list[dict]:
    """Time both ways; returns one row dict per step.

    Each row: ``step``, ``seconds`` (wall clock), ``cpu_seconds`` (process CPU time, all
    threads: the fairer number on a shared machine) and ``how`` (measured or extrapolated).

    Parameters
    ----------
    n_images, n_heads, n_pool, dim, n_texts, rank
        The setting (``n_heads`` a multiple of 16: layers of 16 heads).
    stream_images : int or None
        Images actually streamed through HeadStats (timing scaled to ``n_images``); None: all.
    ref_picks : int
        Picks the reference actually runs on one head (scaled to ``n_texts`` and ``n_heads``).
    batch : int
        Images per HeadStats update.

    Examples
    --------
    >>> rows = run(n_images=400, n_heads=16, n_pool=200, dim=64, stream_images=None)
    >>> rows[-1]["step"]
    'speed-up (reference / streaming)'
    """
    n_layers = max(1, n_heads // 16)
    per_layer = n_heads // n_layers
    gen = SyntheticHeads(n_layers, per_layer, dim, seed)
    rng = np.random.default_rng(seed + 2)
    pool = rng.normal(size=(n_pool, dim))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    texts = [f"text {i}" for i in range(n_pool)]
    rows = []

    # 1. the statistics pass
    streamed = n_images if stream_images is None else min(stream_images, n_images)
    stats = HeadStats()
    t_stats = c_stats = 0.0
    done = 0
    while done < streamed:
        b = min(batch, streamed - done)
        x = gen.batch(b)
        t0, c0 = time.perf_counter(), time.process_time()
        stats.update(x)
        if done + b >= streamed:
            stats.sum_outer  # noqa: B018 - reading adds the staged rows: part of the pass
        t_stats += time.perf_counter() - t0
        c_stats += time.process_time() - c0
        done += b
    scale = n_images / streamed
    rows.append({
        "step": f"HeadStats pass ({n_heads} heads, N={n_images:,}, float32 chunks of 512 "
                "into float64)",
        "seconds": t_stats * scale,
        "cpu_seconds": c_stats * scale,
        "how": "measured" if scale == 1 else f"measured on {streamed:,} images, x{scale:.0f}",
    })

    # 2. TextSpan from the statistics, every head
    t0, c0 = time.perf_counter(), time.process_time()
    fast = {}
    for layer in range(n_layers):
        for h in range(per_layer):
            fast[(layer, h)] = textspan_from_stats(stats, pool, texts, n_texts=n_texts,
                                                   rank=rank, head=(layer, h))
    t_fast, c_fast = time.perf_counter() - t0, time.process_time() - c0
    rows.append({"step": f"textspan_from_stats, {n_heads} heads, M={n_pool:,}, {n_texts} texts",
                 "seconds": t_fast, "cpu_seconds": c_fast, "how": "measured"})
    t_stream = t_stats * scale + t_fast
    c_stream = c_stats * scale + c_fast
    rows.append({"step": "streaming total", "seconds": t_stream, "cpu_seconds": c_stream,
                 "how": "sum of the above"})

    # 3. the reference steps on one head, all N images, extrapolated
    c = gen.head(0, n_images)
    c0 = time.process_time()
    picks, t_svd, t_pick = reference_head(c, pool, ref_picks, rank)
    c_ref = time.process_time() - c0
    per_head = t_svd + n_texts * t_pick
    # CPU time split like the wall time
    c_per_head = c_ref * per_head / max(t_svd + ref_picks * t_pick, 1e-12)
    rows.append({
        "step": f"reference steps, 1 head (SVD {t_svd:.1f} s + {n_texts} x {t_pick:.1f} s/pick)",
        "seconds": per_head,
        "cpu_seconds": c_per_head,
        "how": f"measured SVD and {ref_picks} picks, x{n_texts / ref_picks:g} for the picks",
    })
    rows.append({"step": f"reference steps, {n_heads} heads", "seconds": per_head * n_heads,
                 "cpu_seconds": c_per_head * n_heads, "how": f"1 head x {n_heads}"})
    # the same head through the fast path, on its exact moments: the same picks?
    c64 = c.astype(np.float64)
    moments = (c64.mean(axis=0), c64.T @ c64 / len(c64), len(c64))
    same = textspan_from_stats(moments, pool, n_texts=ref_picks, rank=rank).indices.tolist()
    nan = float("nan")
    rows.append({"step": "same picks as the reference (head 0)", "seconds": nan,
                 "cpu_seconds": nan, "how": str(same == picks)})
    rows.append({"step": "speed-up (reference / streaming)", "seconds": nan, "cpu_seconds": nan,
                 "how": f"{per_head * n_heads / t_stream:.0f}x wall, "
                        f"{c_per_head * n_heads / c_stream:.0f}x CPU"})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| step | wall s | CPU s | how |", "|---|---:|---:|---|"]
    for r in rows:
        sec = "" if np.isnan(r["seconds"]) else f"{r['seconds']:.1f}"
        cpu = "" if np.isnan(r["cpu_seconds"]) else f"{r['cpu_seconds']:.1f}"
        lines.append(f"| {r['step']} | {sec} | {cpu} | {r['how']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--pool", type=int, default=3_500)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--texts", type=int, default=20)
    p.add_argument("--rank", type=int, default=80)
    p.add_argument("--stream-images", type=int, default=2_000)
    p.add_argument("--ref-picks", type=int, default=2)
    p.add_argument("--full", action="store_true", help="stream all images (no extrapolation)")
    a = p.parse_args(argv)
    rows = run(a.images, a.heads, a.pool, a.dim, a.texts, a.rank,
               None if a.full else a.stream_images, a.ref_picks)
    print(markdown(rows))


if __name__ == "__main__":
    main()
