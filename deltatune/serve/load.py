"""A small load generator for ``deltatune serve``: requests/s and p50/p99 latency with 1, 4 and 16 tasks.

    python -m deltatune.serve.load --tasks 1 4 16 --requests 200 --concurrency 16 --out benchmarks/serve_load.json

For each task count it writes that many SSF delta files (random deltas on the offline ViT), starts the real
server (``deltatune serve``) on a free port, sends ``--requests`` image requests from ``--concurrency`` client
threads, tasks round-robin, and stops the server.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

MODEL = "deltatune_offline_vit"


def make_tasks(n: int, folder: Path, method: str = "ssf") -> list[str]:
    """``n`` delta files ``<folder>/task<i>.safetensors`` with random deltas (10 classes each); their names."""
    import deltatune
    from deltatune.backbones import create_backbone

    names = []
    for i in range(n):
        model = create_backbone(MODEL, 10, pretrained=True)
        deltatune.apply(model, method)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        deltatune.save_delta(model, folder / f"task{i}.safetensors")
        names.append(f"task{i}")
    return names


def png(seed: int, size: int = 32) -> bytes:
    """A random RGB PNG."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
    return buf.getvalue()


def predict(url: str, task: str, image: bytes) -> float:
    """One multipart POST /predict; returns its latency in ms (raises on a non-200 answer)."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n\r\n{task}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return 1000 * (time.perf_counter() - start)


def measure(url: str, tasks: list[str], requests: int, concurrency: int) -> dict[str, float]:
    """Requests/s and latency percentiles of ``requests`` concurrent requests, tasks round-robin."""
    images = [png(i) for i in range(16)]
    jobs = [(tasks[i % len(tasks)], images[i % len(images)]) for i in range(requests)]
    for task in tasks:  # warm-up
        predict(url, task, images[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(pool.map(lambda j: predict(url, *j), jobs))
    wall = time.perf_counter() - start
    q = statistics.quantiles(lat, n=100)
    return {"requests_per_s": requests / wall, "p50_ms": q[49], "p99_ms": q[98], "requests": requests}


def serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Starts ``deltatune serve`` on a free port; returns the process and its URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "deltatune.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"deltatune serve exited with {proc.returncode}") from None
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("deltatune serve did not start within 120 s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", help="JSON file for the results")
    ns = parser.parse_args(argv)
    results: dict[str, Any] = {"model": MODEL, "concurrency": ns.concurrency, "max_batch": ns.max_batch,
                               "max_wait_ms": ns.max_wait_ms, "threads": torch.get_num_threads(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_tasks(max(ns.tasks), folder)
        for n in ns.tasks:
            specs = [a for name in names[:n] for a in ("--task", f"{name}={folder / name}.safetensors")]
            proc, url = serve([*specs, "--max-batch", str(ns.max_batch), "--max-wait-ms", str(ns.max_wait_ms)])
            try:
                results["runs"][str(n)] = row = measure(url, names[:n], ns.requests, ns.concurrency)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"{n:>3} tasks: {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                  f"p99 {row['p99_ms']:7.1f} ms")
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
