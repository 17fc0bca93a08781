"""Throughput and memory of ``run_dataset``: one process against two Dask workers, at two
collection sizes (peak memory must not grow with the number of images).

Each measurement runs in a fresh subprocess, which reports

* images/s of the run itself (the store's run summary: model loading and cluster start-up
  excluded, decoding, decomposing, writing and statistics included);
* ``tracemalloc`` peak of the Python allocations of the process (NumPy arrays included);
* peak resident memory of the process (VmHWM, i.e. ru_maxrss without what fork + exec carries
  over from the parent) and, for Dask, of the larger of its two worker processes.

The model is a random-weight CLIP vision tower of ViT-S/16 geometry (width 384, 6 layers,
6 heads, 224 pixels; made with transformers once, then run by clipdecomp's C core); the images
are 320x240 JPEGs. Usage::

    python benchmarks/bench_dataset.py [--sizes 48,144] [--quick]

``--pipeline N`` measures instead, in one process, whole folders against the compute alone:
``run_dataset`` (``clipdecomp run``: decode, preprocess, decompose, statistics, compressed
store writes) on N 500x375 JPEGs, against ``decompose`` on the same images already decoded and
preprocessed (the same batches, the same model and threads), in alternation over ``--rounds``
rounds (a fresh store each time, deleted after the round untimed); it prints both images/s,
their ratio, the CPU time per image of each (all threads of the process: on a machine with no
idle core, what the run adds to the compute shows there first), the ISA path and the load
average. ``--threads`` sets the model's threads
(default: every CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GEOMETRY = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                "num_attention_heads": 6, "image_size": 224, "patch_size": 16, "projection_dim": 256}
#: ``--pipeline --model B16``: ViT-B/16's vision tower, the geometry users run most
B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
       "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "projection_dim": 512}
QUICK = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 4, "image_size": 96, "patch_size": 16, "projection_dim": 64}


def make_model(root: Path, geometry: dict) -> str:
    """A random-weight transformers CLIP vision tower saved as safetensors; returns its dir."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_act="quick_gelu", **geometry)
    model = CLIPVisionModelWithProjection(cfg).eval()
    out = root / "model"
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def make_images(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> str:
    """n JPEG images (size = (width, height), smooth colours plus noise) in one folder."""
    from PIL import Image

    w, h = size
    d = root / f"images_{n}_{w}x{h}"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        c = rng.uniform(size=(3, 3))
        img = c[:, 0] * yy[..., None] / h + c[:, 1] * xx[..., None] / w + 0.2 * c[:, 2]
        img = np.clip(img + rng.normal(scale=0.05, size=img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return str(d)


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM (Linux; unlike ru_maxrss it does not carry
    the parent's size over fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(job: dict) -> dict:
    """Run in the measuring subprocess: one run_dataset, its rate and peak memory."""
    from clipdecomp.data.runner import run_dataset
    from clipdecomp.engine.loading import ModelSpec

    client = None
    if job["workers"]:
        from clipdecomp.data.distributed import local_client

        client = local_client(job["workers"], threads=job["threads"])
    tracemalloc.start()
    spec = ModelSpec(job["model"], {"threads": job["threads"]})
    t0 = time.perf_counter()
    store = run_dataset(spec, job["images"], job["out"], chunk_size=job["chunk_size"],
                        batch_size=job["batch_size"], layers=None, progress=False,
                        client=client)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    workers_peak = None
    if client is not None:
        workers_peak = max(client.run(peak_rss_mib).values())
        cluster = client.cluster
        client.close()
        cluster.close()
    run = store.runs[-1]
    return {
        "images_per_s": run["images_per_s"],
        "seconds": run["seconds"],
        "wall_s": round(wall, 2),
        "tracemalloc_peak_MiB": peak / 2**20,
        "peak_rss_MiB": peak_rss_mib(),
        "workers_peak_rss_MiB": workers_peak,
    }


def pipeline_child(job: dict) -> dict:
    """Run in the measuring subprocess: run_dataset on a folder against decompose on arrays."""
    import shutil

    from clipdecomp.data.chunks import _decompose
    from clipdecomp.data.runner import run_dataset
    from clipdecomp.data.sources import open_source
    from clipdecomp.engine.loading import load

    model = load(job["model"], threads=job["threads"])
    src = open_source(job["images"])
    paths = [src.abspath(i) for i in range(len(src))]
    pixels = model.preprocess(paths)
    bs = job["batch_size"]

    def arrays():
        for i in range(0, len(pixels), bs):
            _decompose(model, pixels[i:i + bs])

    def folder(k=[0]) -> tuple[float, float]:  # noqa: B006 (a counter: a fresh store each call)
        """Wall and CPU seconds (all threads) of one run into a fresh store (deleting the store
        afterwards not counted)."""
        k[0] += 1
        out = os.path.join(job["out"], f"run{k[0]}.zarr")
        t0, c0 = time.perf_counter(), time.process_time()
        run_dataset(model, job["images"], out, chunk_size=job["chunk_size"], batch_size=bs,
                    layers=None, progress=False)
        seconds = time.perf_counter() - t0, time.process_time() - c0
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    def timed(fn) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    load0 = os.getloadavg()
    arrays()  # warm-up
    t_run, t_arr = [], []
    for _ in range(job["rounds"]):
        t_run.append(folder())
        t_arr.append(timed(arrays))
    n = len(paths)
    wall_run, cpu_run = np.median(np.asarray(t_run), axis=0)
    wall_arr, cpu_arr = np.median(np.asarray(t_arr), axis=0)
    run_s, arr_s = n / float(wall_run), n / float(wall_arr)
    from clipdecomp.engine import core

    return {"images": n, "threads": job["threads"], "batch_size": bs, "isa": core.isa(),
            "chunk_size": job["chunk_size"], "run_images_per_s": run_s,
            "arrays_images_per_s": arr_s, "ratio": run_s / arr_s, "load_before": load0,
            "run_cpu_ms": 1e3 * float(cpu_run) / n, "arrays_cpu_ms": 1e3 * float(cpu_arr) / n,
            "load_after": os.getloadavg()}


def pipeline(n: int, rounds: int = 3, chunk_size: int = 16, batch_size: int = 8,
             quick: bool = False, threads: int | None = None, model: str = "S16-6") -> dict:
    """``clipdecomp run`` images/s against decompose on preprocessed arrays (one process).

    ``model``: ``"S16-6"`` (the ViT-S/16 geometry with 6 layers of :data:`GEOMETRY`) or
    ``"B16"`` (:data:`B16`); the decoding and writing cost per image is the same for both, the
    model's time is not."""
    cpus = threads or os.cpu_count() or 1
    geometry = QUICK if quick else {"S16-6": GEOMETRY, "B16": B16}[model]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = _python(["--make-model", str(tmp), "--geometry", json.dumps(geometry)], 1)
        images = make_images(tmp, n, size=(500, 375))
        job = {"model": model_dir, "images": images, "out": str(tmp), "rounds": rounds,
               "chunk_size": chunk_size, "batch_size": batch_size, "threads": cpus}
        out = json.loads(_python(["--pipeline-child", json.dumps(job)], cpus))
        out["model"] = "quick" if quick else model
        return out


def pipeline_markdown(rows: dict | list[dict], command: str) -> str:
    """The table of one or more :func:`pipeline` results (one row each)."""
    rows = [rows] if isinstance(rows, dict) else rows
    loads = "; ".join(
        f"{r.get('model', 'S16-6')}: before {tuple(round(x, 2) for x in r['load_before'])}, "
        f"after {tuple(round(x, 2) for x in r['load_after'])}" for r in rows)
    lines = [
        f"Command: `{command}`  ",
        f"ISA path: {rows[0].get('isa', '?')}  ",
        f"load average {loads}", "",
        ("| model | images (500x375 JPEG) | threads | batch | chunk | `clipdecomp run` img/s "
         "| decompose on arrays img/s | run / arrays | CPU ms/img run | CPU ms/img arrays "
         "| CPU arrays / run |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.get('model', 'S16-6')} | {r['images']} | {r['threads']} | {r['batch_size']} "
            f"| {r['chunk_size']} | {r['run_images_per_s']:.2f} | "
            f"{r['arrays_images_per_s']:.2f} | {r['ratio']:.2f} | {r['run_cpu_ms']:.1f} | "
            f"{r['arrays_cpu_ms']:.1f} | {r['arrays_cpu_ms'] / r['run_cpu_ms']:.2f} |")
    return "\n".join(lines)


def _python(args: list, threads: int, timeout: float = 1800) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, __file__, *args], env=env, check=False,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{p.stderr[-3000:]}")
    return p.stdout.strip().splitlines()[-1]


def measure(job: dict) -> dict:
    return json.loads(_python(["--child", json.dumps(job)], job["threads"]))


def run(sizes=(48, 144), quick: bool = False, chunk_size: int = 16,
        batch_size: int = 8) -> list[dict]:
    """Rows: one per (mode, collection size) with images/s and peak memory."""
    cpus = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the model is made in a subprocess: torch never enters this process or its children
        model = _python(["--make-model", str(tmp), "--geometry", json.dumps(
            QUICK if quick else GEOMETRY)], 1)
        for n in sizes:
            images = make_images(tmp, n)
            for mode, workers in (("1 process", 0), ("2 Dask workers", 2)):
                threads = cpus if not workers else max(1, cpus // workers)
                job = {"model": model, "images": images, "out": str(tmp / f"{n}_{workers}.zarr"),
                           "chunk_size": chunk_size, "batch_size": batch_size, "workers": workers,
                           "threads": threads}
                r = measure(job)
                rows.append({"mode": mode, "images": n, "chunk_size": chunk_size,
                             "batch_size": batch_size, "threads": threads, **r})
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["mode", "images", "images_per_s", "seconds", "tracemalloc_peak_MiB", "peak_rss_MiB",
            "workers_peak_rss_MiB", "threads", "chunk_size", "batch_size"]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="48,144")
    ap.add_argument("--quick", action="store_true", help="a smaller model and images")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pipeline", type=int, default=0,
                    help="images: run_dataset on a folder against decompose on arrays")
    ap.add_argument("--model", choices=("S16-6", "B16"), default="S16-6",
                    help="--pipeline: the vision tower's geometry (S16-6: ViT-S/16 with 6 "
                         "layers; B16: ViT-B/16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="--pipeline: the model's threads (default: every CPU)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pipeline-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--geometry", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.pipeline_child:
        print(json.dumps(pipeline_child(json.loads(a.pipeline_child))))
        return 0
    if a.pipeline:
        r = pipeline(a.pipeline, a.rounds, a.chunk_size, a.batch_size, a.quick, a.threads,
                     a.model)
        cmd = "python benchmarks/bench_dataset.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        print(pipeline_markdown(r, cmd.strip()))
        return 0
    if a.make_model:
        print(make_model(Path(a.make_model), json.loads(a.geometry)))
        return 0
    rows = run(tuple(int(s) for s in a.sizes.split(",")), a.quick, a.chunk_size, a.batch_size)
    print(f"run_dataset on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; model {'quick' if a.quick else 'ViT-S/16 geometry'}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
