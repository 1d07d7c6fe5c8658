"""deltatune serve: the real server process on a free port, real HTTP requests, answers equal direct model calls."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import perturb_deltas
from PIL import Image

import deltatune
from deltatune.backbones import create_backbone
from deltatune.serve.server import preprocessor

ROOT = Path(__file__).resolve().parents[1]
MODEL = "deltatune_offline_vit"
TASKS = {"ssf": ("ssf", 3), "lora": ("lora", 4), "bitfit": ("bitfit", 5)}


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _post(url: str, fields: dict[str, str], file: tuple[str, bytes, str] | None) -> tuple[int, dict]:
    """A multipart POST with the standard library; returns (status, JSON body)."""
    boundary, parts = uuid.uuid4().hex, []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    if file:
        name, data, ctype = file
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        parts.append(f"{head}Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, object]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    paths = {}
    for i, (name, (method, classes)) in enumerate(TASKS.items()):
        model = create_backbone(MODEL, classes, pretrained=True).eval()
        deltatune.apply(model, method)
        perturb_deltas(model, seed=i)
        paths[name] = folder / name / "delta.safetensors"
        deltatune.save_delta(model, paths[name])
    (folder / "ssf" / "report.json").write_text(json.dumps({"top1": 87.5, "class_names": ["cat", "dog", "fox"]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", MODEL, "--tasks-dir", str(folder), "--port", str(port), "--max-upload-mb", "0.05"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            _get(url + "/health")
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode()) from None
            time.sleep(0.2)
    yield url, paths
    proc.terminate()
    proc.wait(timeout=20)


def test_concurrent_mixed_requests_match_direct_calls(server):
    url, paths = server
    jobs = [(name, seed) for seed in range(4) for name in TASKS]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda j: _post(url + "/predict", {"task": j[0], "top_k": "2"},
                                                ("x.png", _png(j[1]), "image/png")), jobs))
    models = {n: deltatune.load_delta(create_backbone(MODEL, c, pretrained=True), paths[n]).eval()
              for n, (_, c) in TASKS.items()}
    prep = preprocessor(models["ssf"])
    for (name, seed), (status, body) in zip(jobs, answers):
        assert status == 200, body
        with torch.no_grad():
            probs = models[name](prep(_png(seed))[None])[0].softmax(-1)
        top = probs.topk(2)
        assert [t["index"] for t in body["top"]] == top.indices.tolist()
        assert [t["prob"] for t in body["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert answers[0][1]["top"][0]["label"] in ("cat", "dog", "fox")  # class names from report.json
    status, health = _get(url + "/health")
    assert health["batches"] < len(jobs)  # concurrent requests shared batches


def test_tasks_lists_methods_sizes_and_accuracy(server):
    url, paths = server
    _, tasks = _get(url + "/tasks")
    info = {t["name"]: t for t in tasks}
    assert set(info) == set(TASKS)
    assert info["ssf"]["methods"] == ["ssf"] and info["ssf"]["top1"] == 87.5
    assert info["lora"]["file_bytes"] == paths["lora"].stat().st_size
    assert info["bitfit"]["classes"] == 5 and info["bitfit"]["parameters"] > 0


@pytest.mark.parametrize(
    ("fields", "file", "status", "words"),
    [
        ({"task": "nope"}, ("x.png", b"", "image/png"), 404, "unknown task 'nope'"),
        ({"task": "ssf"}, ("x.png", b"not an image", "image/png"), 400, "cannot decode"),
        ({"task": "ssf"}, ("x.txt", b"hello", "text/plain"), 415, "content type"),
        ({"task": "ssf"}, ("x.png", b"\0" * 60000, "image/png"), 413, "larger than"),
        ({"task": "ssf"}, None, 422, "file"),
        ({}, ("x.png", b"", "image/png"), 422, "task"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, fields, file, status, words):
    url, _ = server
    got, body = _post(url + "/predict", fields, file)
    assert got == status and words in body["error"], body
    assert _post(url + "/predict", {"task": "ssf"}, ("x.png", _png(0), "image/png"))[0] == 200


def test_corrupt_delta_file_refused_at_startup_naming_it(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\0\0\0\0\0\0\0{}      junk")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "deltatune.cli", "serve", "--task", f"bad={bad}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bad.safetensors" in proc.stderr


def test_demo_serves_the_demo_layout(server, tmp_path, monkeypatch):
    """``serve --demo`` reads runs/demo/<method>/delta.safetensors (what ``deltatune demo`` writes)."""
    from deltatune.cli import build_parser
    from deltatune.serve.server import build_model

    _, paths = server
    demo = tmp_path / "runs" / "demo"
    for name, path in paths.items():
        (demo / name).mkdir(parents=True)
        (demo / name / "delta.safetensors").write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    model = build_model(build_parser().parse_args(["serve", "--demo"]))
    assert model.tasks() == sorted(TASKS)
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(deltatune.DeltaTuneError, match="run `deltatune demo` first"):
        build_model(build_parser().parse_args(["serve", "--demo"]))
