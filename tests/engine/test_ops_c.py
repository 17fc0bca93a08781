"""The ops of the C core (csrc/ops.c) against their naive references, via csrc/tests/test_ops.c.

The C test program compares every fast op with the ``*_naive`` reference beside it on every
instruction-set path the CPU has: exact-erf GELU and QuickGELU (vectorised polynomials, NaN and
infinities, large arguments), LayerNorm (constant rows, in place), softmax (masked tails,
underflow), the fused row-blocked attention (N across the 48-row block boundary, head widths 1
to 128, causal, class-row and head-mean maps, one thread and several, scratch of exactly the
documented size) and the small element-wise ops. Tolerances follow float32 rounding; they are
stated at the top of the C file.

It is built and run here three ways when a C compiler with OpenMP is present: plain; under
AddressSanitizer + UBSan (skipped where the compiler has no libasan), which turns any overrun of
a buffer of documented size into a failure; and with the AVX-512 GEMM kernel on portable
stand-ins for its intrinsics (csrc/tests/avx512_emu.h), so the attention runs over the AVX-512
tiling on any x86-64.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "csrc"
SOURCES = ("ops.c", "attention_amx.c", "gemm.c", "gemm_avx2.c", "gemm_avx512.c", "cpu.c", "tests/test_ops.c")
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined"]


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or sys.platform == "win32":
        pytest.skip("no C compiler")
    return cc


def _has_asan(cc: str) -> bool:
    """Whether ``cc`` has the ASan and UBSan runtimes (gcc without libasan has not)."""
    for lib in ("libasan.so", "libubsan.so"):
        found = subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True, text=True,
                               check=False).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            return False
    return True


def _cpu_has_avx512() -> bool:
    """Whether this CPU reports AVX-512F (Linux; True where that cannot be read)."""
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True


def _compile(cc: str, flags: dict[str, list[str]], outdir: Path) -> dict[str, Path]:
    """Compile each file of ``flags`` (a path under csrc/) with its flags, two at a time."""
    def one(f: str) -> subprocess.CompletedProcess:
        cmd = [cc, *flags[f], "-std=c11", "-fopenmp", "-Wall", "-Wextra", "-I", str(SRC), "-c",
               str(SRC / f), "-o", str(outdir / (Path(f).stem + ".o"))]
        return subprocess.run(cmd, check=False, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, flags))
    for res in results:
        if res.returncode != 0 and "fopenmp" in res.stderr:
            pytest.skip(f"{cc} cannot build with OpenMP")
        assert res.returncode == 0, res.stderr
    return {f: outdir / (Path(f).stem + ".o") for f in flags}


def _link(cc: str, objects: dict[str, Path], link: list[str], out: Path) -> Path:
    res = subprocess.run([cc, *link, "-fopenmp", "-o", str(out),
                          *(str(objects[f]) for f in SOURCES), "-lm"],
                         check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def native_objects(tmp_path_factory) -> dict[str, Path]:
    """SOURCES compiled with -O2, shared by the native and the emulated builds."""
    return _compile(_compiler(), {f: ["-O2"] for f in SOURCES},
                    tmp_path_factory.mktemp("ops_native"))


@pytest.mark.parametrize("variant", ["native", "sanitize", "avx512-emulated"])
def test_c_ops_program(request, tmp_path, variant):
    """Build csrc/tests/test_ops.c and run it; every check must pass on every path."""
    cc = _compiler()
    link: list[str] = []
    if variant == "native":
        objects = request.getfixturevalue("native_objects")
    elif variant == "sanitize":
        if not _has_asan(cc):
            pytest.skip(f"{cc} has no libasan / libubsan")
        flags = {f: SANITIZE for f in SOURCES}
        if not _cpu_has_avx512():
            # its kernels cannot run here: no need to instrument them (the slowest compile)
            flags["gemm_avx512.c"] = ["-O1"]
        objects = _compile(cc, flags, tmp_path)
        link = ["-fsanitize=address,undefined"]
    else:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip("the AVX-512 kernel exists on x86-64 only")
        # only the files that read CD_AVX512_EMULATE are rebuilt with it (cpu.c, gemm_avx512.c;
        # the latter at -O1: as fast to run, a third of the compile time)
        emu = [f for f in SOURCES if "CD_AVX512_EMULATE" in (SRC / f).read_text()]
        flags = {f: ["-O1" if f == "gemm_avx512.c" else "-O2", "-DCD_AVX512_EMULATE"]
                 for f in emu}
        objects = {**request.getfixturevalue("native_objects"), **_compile(cc, flags, tmp_path)}
    exe = _link(cc, objects, link, tmp_path / "test_ops")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("CLIPDECOMP_ISA", None)   # the program chooses every path itself
    if variant == "sanitize":
        # the ops allocate nothing; leak checking (which some containers do not allow) would
        # only test the test program
        env["ASAN_OPTIONS"] = "detect_leaks=0"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    args = [str(exe), "avx512"] if variant == "avx512-emulated" else [str(exe)]
    run = subprocess.run(args, check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " 0 failed" in run.stdout
    assert "runtime error" not in run.stderr, run.stderr[-4000:]
    if variant == "avx512-emulated":
        assert "best path on this CPU: avx512" in run.stdout
        assert "path avx512: ok" in run.stdout
    else:
        assert "path generic: ok" in run.stdout
