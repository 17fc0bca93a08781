"""The GEMM kernels of the C core against float64 NumPy, on every instruction-set path the CPU has.

``clipdecomp._core._matmul`` (packed weight, ``nn.Linear`` convention), ``_sgemm_nt`` and
``_sgemm_nn`` (strided operands, used by the attention) are checked on awkward shapes: one row,
depth one, sizes that are no multiple of the vector width or of the register tile, depths that
span several cache blocks. The tolerance follows float32 rounding of a K-term sum:
``|got - exact| <= 4 * eps * sqrt(K + 1) * (|A| @ |B| + |bias|)`` elementwise.

The C test program ``csrc/tests/test_gemm.c`` (strides, threads, accumulate, calls from inside a
parallel region) is built and run here too when a C compiler is present, once natively and once
with the AVX-512 kernel on portable stand-ins for its intrinsics.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ISAS = ("generic", "avx2", "avx512")
EPS32 = float(np.finfo(np.float32).eps)

MATMUL_SHAPES = [  # M, K, OC
    (1, 1, 1),
    (1, 768, 37),
    (2, 3, 17),
    (6, 16, 16),
    (7, 9, 31),
    (13, 33, 47),
    (29, 300, 70),
    (50, 517, 96),
    (97, 70, 129),
    (64, 1100, 24),
    (3, 2, 1000),
]
SGEMM_SHAPES = [  # M, N, K
    (1, 1, 1),
    (1, 17, 5),
    (5, 1, 9),
    (7, 33, 1),
    (20, 50, 64),
    (37, 64, 37),
    (64, 31, 257),
    (70, 70, 300),
    (50, 45, 20),
]


def _has(requires_core, name: str) -> bool:
    """Whether this CPU runs path ``name`` (leaves the current path unchanged)."""
    before = requires_core.isa()
    try:
        requires_core.set_isa(name)
    except ValueError:
        return False
    finally:
        requires_core.set_isa(before)
    return True


@pytest.fixture(params=ISAS)
def isa(request, requires_core):
    """Each instruction-set path in turn (skipped where the CPU lacks it); restored after."""
    name = request.param
    if not _has(requires_core, name):
        pytest.skip(f"this CPU has no {name} path")
    before = requires_core.isa()
    requires_core.set_isa(name)
    yield name
    requires_core.set_isa(before)


def _rand(rng, *shape):
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


def _assert_close(got, exact, bound, k):
    """``got`` within the float32 rounding bound of a ``k``-term sum of magnitude ``bound``."""
    tol = 4.0 * EPS32 * np.sqrt(k + 1.0) * bound + 1e-30
    err = np.abs(got.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), (
        f"max excess at {worst}: got {got[worst]!r}, exact {exact[worst]!r}, tol {tol[worst]!r}"
    )


@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matmul_matches_float64(requires_core, isa, shape, with_bias):
    M, K, OC = shape
    rng = np.random.default_rng(M * 1000 + K + OC)
    x, w = _rand(rng, M, K), _rand(rng, OC, K)
    b = _rand(rng, OC) if with_bias else None
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    exact = x64 @ w64.T + (b.astype(np.float64) if with_bias else 0.0)
    bound = np.abs(x64) @ np.abs(w64).T + (np.abs(b.astype(np.float64)) if with_bias else 0.0)
    for naive in (False, True):
        out = requires_core._matmul(x, w, b, naive=naive)
        assert out.shape == (M, OC) and out.dtype == np.float32
        _assert_close(out, exact, bound, K)


@pytest.mark.parametrize("shape", SGEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sgemm_nt_and_nn_match_float64(requires_core, isa, shape):
    M, N, K = shape
    rng = np.random.default_rng(M * 1000 + N * 10 + K)
    a, b = _rand(rng, M, K), _rand(rng, N, K)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact, bound = a64 @ b64.T, np.abs(a64) @ np.abs(b64).T
    bt = np.ascontiguousarray(b.T)  # [K, N]
    for naive in (False, True):
        nt = requires_core._sgemm_nt(a, b, naive=naive)
        nn = requires_core._sgemm_nn(a, bt, naive=naive)
        assert nt.shape == nn.shape == (M, N)
        _assert_close(nt, exact, bound, K)
        _assert_close(nn, exact, bound, K)


def test_attention_sized_products(requires_core, isa):
    """q k^T over 197 tokens of width 64, then probabilities @ v, as one attention head does."""
    rng = np.random.default_rng(7)
    q, k, v = (_rand(rng, 197, 64) for _ in range(3))
    s = requires_core._sgemm_nt(q, k)
    exact = q.astype(np.float64) @ k.astype(np.float64).T
    _assert_close(s, exact, np.abs(q.astype(np.float64)) @ np.abs(k.astype(np.float64)).T, 64)
    p = np.exp(s - s.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    o = requires_core._sgemm_nn(p, v)
    p64, v64 = p.astype(np.float64), v.astype(np.float64)
    _assert_close(o, p64 @ v64, np.abs(p64) @ np.abs(v64), 197)


def test_matmul_on_model_shape(requires_core, isa):
    """One ViT-B/16 qkv product on two images: several row blocks, column blocks, depth slices."""
    rng = np.random.default_rng(3)
    x, w, b = _rand(rng, 2 * 197, 768), _rand(rng, 3 * 768, 768), _rand(rng, 3 * 768)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    out = requires_core._matmul(x, w, b)
    _assert_close(out, x64 @ w64.T + b, np.abs(x64) @ np.abs(w64).T + np.abs(b), 768)


def test_paths_agree_bitwise_with_themselves(requires_core, isa):
    """Same inputs, same path: the same bits (no uninitialised memory, no races)."""
    rng = np.random.default_rng(11)
    x, w, b = _rand(rng, 61, 130), _rand(rng, 45, 130), _rand(rng, 45)
    first = requires_core._matmul(x, w, b)
    for _ in range(3):
        np.testing.assert_array_equal(requires_core._matmul(x, w, b), first)


def test_isa_names_and_errors(requires_core):
    before = requires_core.isa()
    assert before in ISAS
    assert _has(requires_core, "generic")
    requires_core.set_isa("generic")
    assert requires_core.isa() == "generic"
    with pytest.raises(ValueError):
        requires_core.set_isa("sse9")
    assert requires_core.isa() == "generic"  # a refused name changes nothing
    requires_core.set_isa(before)
    assert requires_core.isa() == before


def test_shape_errors(requires_core):
    with pytest.raises(ValueError):
        requires_core._matmul(np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError):
        requires_core._matmul(np.zeros((3, 4), np.float32), np.zeros((5, 4), np.float32),
                     np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        requires_core._sgemm_nt(np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError):
        requires_core._sgemm_nn(np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32))


def _isa_in_subprocess(env_value: str) -> str:
    env = dict(os.environ, CLIPDECOMP_ISA=env_value, OMP_NUM_THREADS="1")
    code = "from clipdecomp import _core; print(_core.isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return out.stdout.strip()


def test_env_var_forces_the_path(requires_core):
    best = max((name for name in ISAS if _has(requires_core, name)), key=ISAS.index)
    assert _isa_in_subprocess("generic") == "generic"
    # a path the CPU lacks (or a name that is none) falls back to the best one it has, never
    # to a crash
    assert _isa_in_subprocess("avx512") == ("avx512" if best == "avx512" else best)
    assert _isa_in_subprocess("nonsense") == best


@pytest.mark.parametrize("emulate_avx512", [False, True], ids=["native", "avx512-emulated"])
def test_c_test_program(tmp_path, emulate_avx512):
    """Build csrc/tests/test_gemm.c against the kernels and run it on every path the CPU has.

    ``avx512-emulated`` builds the AVX-512 kernel on portable stand-ins for its intrinsics
    (csrc/tests/avx512_emu.h), so its tiling and masking logic is checked on any x86-64.
    """
    import platform

    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or sys.platform == "win32":
        pytest.skip("no C compiler")
    if emulate_avx512 and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AVX-512 kernel exists on x86-64 only")
    src = ROOT / "csrc"
    exe = tmp_path / "test_gemm"
    files = [src / f for f in ("gemm.c", "gemm_avx2.c", "gemm_avx512.c", "cpu.c")]
    cmd = [cc, "-O1", "-std=c11", "-fopenmp", "-I", str(src), "-o", str(exe), *map(str, files),
           str(src / "tests" / "test_gemm.c"), "-lm"]
    if emulate_avx512:
        cmd.insert(1, "-DCD_AVX512_EMULATE")
    build = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if build.returncode != 0 and "fopenmp" in build.stderr:
        pytest.skip(f"{cc} cannot build with OpenMP")
    assert build.returncode == 0, build.stderr
    args = [str(exe), "avx512"] if emulate_avx512 else [str(exe)]
    run = subprocess.run(args, check=False, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " 0 failed" in run.stdout
    if emulate_avx512:
        assert "path avx512: ok" in run.stdout


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("gcc", "ld", "nm", "objcopy", "git"))
                    or not (ROOT / ".git").exists(), reason="needs gcc, binutils and a checkout")
def test_gemm_ab_benchmark_links_two_revisions_and_agrees():
    """benchmarks/bench_gemm_ab.py: the base revision's GEMM, renamed, beside the tree's in one
    binary. Both compute the same products: their outputs may differ only by the rounding of
    sums taken in another order (float32 on a product of unit-scaled inputs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gemm_ab
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shapes = [("a", 40, 96, 50), ("b", 300, 1100, 800)]
    rows = bench_gemm_ab.run("HEAD", "fp32", rounds=1, threads=1, shapes=shapes)
    assert [(r["op"], r["M"], r["K"], r["N"]) for r in rows] == shapes
    for r in rows:
        assert r["base_gflops"] > 0 and r["this_gflops"] > 0 and r["ratio"] > 0
        assert r["max_diff"] < 1e-3, r


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_peak_benchmark_bounds_every_kernel_by_its_instruction(requires_core):
    """benchmarks/bench_peak.py: a GEMM kernel cannot multiply-add faster than the instruction it
    is built on, so GEMM / peak lies in (0, 1] on every path. A peak that merged its chains or
    miscounted its FLOP per round would push a ratio out of that range (well below the 0.05
    floor here, or above 1)."""
    if not _has(requires_core, "avx2"):
        pytest.skip("the peak kernels are x86-64 AVX2 and wider")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_peak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = bench_peak.run(rounds=1)
    paths = {r["path"] for r in res["rows"]}
    assert "fp32 avx2" in paths
    assert ("fp32 avx512" in paths) == _has(requires_core, "avx512")
    assert ("bf16 vdpbf16ps" in paths) == bool(requires_core.has_bf16())
    # under ASan/UBSan (tests/sanitize.sh) the instrumented GEMM runs far below any peak, so
    # there only the upper bound holds
    instrumented = "libasan" in os.environ.get("LD_PRELOAD", "")
    for r in res["rows"]:
        assert r["peak"] > 0 and r["gemm"] > 0, r
        assert r["ratio"] <= 1.1, r
        if not instrumented:
            assert r["ratio"] > 0.05, r


def test_avx2_benchmark_holds_both_sides_to_avx2(requires_core):
    """benchmarks/bench_avx2.py measures PyTorch with MKL held to AVX2 on a wider CPU: the
    environment it sets must reach MKL (its verbose mode names the instruction set)."""
    torch = pytest.importorskip("torch")
    if not torch.backends.mkl.is_available() or not _has(requires_core, "avx2"):
        pytest.skip("needs PyTorch built with MKL on an x86-64 CPU with AVX2")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_avx2
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    free = {k: v for k, v in os.environ.items() if k not in bench_avx2.AVX2_ENV}
    assert bench_avx2.mkl_isa(dict(free, **bench_avx2.AVX2_ENV)) == "AVX2"
