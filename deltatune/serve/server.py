"""``deltatune serve``: an HTTP server (FastAPI + uvicorn) for many tasks on one backbone, batched across tasks.

    deltatune serve --model deltatune_offline_vit --task ssf=runs/demo/ssf/delta.safetensors --task lora=...
    deltatune serve --demo                  # the delta files ``deltatune demo`` wrote, on the offline ViT
    curl -F task=ssf -F file=@cat.png http://127.0.0.1:8000/predict

Concurrent requests wait in one queue; a worker takes up to ``--max-batch`` of them (waiting at most
``--max-wait-ms`` after the first) and runs them as ONE mixed-task batch (``MultiTaskModel``). ``POST /predict``
(multipart: ``task``, ``file``, optional ``top_k``) returns the top-k labels with probabilities; ``GET /tasks`` each
task's methods, parameters, file bytes and recorded accuracy; ``GET /health``. Bad requests get a 4xx JSON
``{"error": ...}``; a delta file that fails its checks stops the start-up, naming the file.
"""

import argparse
import asyncio
import functools
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch

from deltatune.checkpoint import read_metadata
from deltatune.errors import DeltaTuneError
from deltatune.predict import image_transform, run_transform
from deltatune.serve.multitask import MultiTaskModel

LOG = logging.getLogger("deltatune.serve")
DEMO_DIR = "runs/demo"


class Batcher:
    """Collects concurrent requests into mixed-task batches and runs them on one worker thread."""

    def __init__(self, model: MultiTaskModel, max_batch: int, max_wait_ms: float) -> None:
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="deltatune-infer")
        self.batches = 0

    async def submit(self, image: torch.Tensor, task: str) -> torch.Tensor:
        """This image's class probabilities under ``task`` (its own class count)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, task, future))
        return await future

    async def run(self) -> None:
        """The worker loop: one batch at a time, each as full as the wait allows."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                probs = await loop.run_in_executor(self.pool, self._infer, items)
                for (_, _, future), p in zip(items, probs):
                    future.done() or future.set_result(p)
            except Exception as e:  # a failed batch fails its requests, never the server
                for _, _, future in items:
                    future.done() or future.set_exception(e)

    @torch.inference_mode()
    def _infer(self, items: list) -> list[torch.Tensor]:
        self.batches += 1
        tasks = [t for _, t, _ in items]
        logits = self.model(torch.stack([x for x, _, _ in items]), tasks)
        return [row.softmax(-1) for row in self.model.split(logits, tasks)]


def task_info(model: MultiTaskModel, name: str) -> dict[str, Any]:
    """What ``GET /tasks`` shows for a task: methods, parameters, file bytes, accuracy from its report.json."""
    task = model.task(name)
    report = _report(task.path)
    return {
        "name": name,
        "methods": task.methods,
        "parameters": task.delta_params,
        "file_bytes": task.file_bytes,
        "classes": task.num_classes,
        "top1": report.get("top1"),
        "mixed_kernel": task.plan is not None,
        "file": str(task.path),
    }


def _report(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path.parent / "report.json").read_text())
    except (OSError, ValueError):
        return {}


@functools.cache
def _file_classes(path: Path) -> Any:
    """The class names a delta file records (``save_delta(..., classes=...)``; ``deltatune train`` writes them)."""
    return read_metadata(path).get("classes")


def class_names(model: MultiTaskModel, name: str) -> list[str]:
    """The task's class names: from its delta file, else its report.json (``class_names``), else the indices."""
    names = _file_classes(model.task(name).path) or _report(model.task(name).path).get("class_names")
    n = model.task(name).num_classes
    return [str(c) for c in names] if isinstance(names, list) and len(names) == n else [str(i) for i in range(n)]


def preprocessor(backbone: torch.nn.Module, kind: str = "timm") -> Any:
    """The evaluation preprocessing ``deltatune predict`` uses (``kind``: a run's ``eval_transform``): bytes ->
    (3, H, W) tensor, so a served task sees its images as its training run evaluated them."""
    from PIL import Image

    transform = image_transform(backbone, kind)

    def run(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            return transform(image.convert("RGB"))

    return run


def create_app(model: MultiTaskModel, max_batch: int = 16, max_wait_ms: float = 5.0, max_bytes: int = 10 << 20):
    """The FastAPI application serving ``model``'s tasks."""
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    model.eval()
    preprocessors: dict[str, Any] = {}

    def preprocess(data: bytes, task: str) -> torch.Tensor:
        if task not in preprocessors:  # each task as its run evaluated (the demo's offline tasks: a plain resize)
            preprocessors[task] = preprocessor(model.backbone, run_transform(model.task(task).path))
        return preprocessors[task](data)
    batcher = Batcher(model, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    error = lambda status, text: JSONResponse({"error": text}, status_code=status)  # noqa: E731

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{e.get('msg', 'invalid')}: {'.'.join(map(str, e.get('loc', [])[1:]))}" for e in exc.errors()]
        return error(422, "; ".join(problems) + " (POST multipart fields: task, file, optional top_k)")

    @app.middleware("http")
    async def log_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        LOG.info("%s %s -> %d in %.1f ms", request.method, request.url.path, response.status_code,
                 1000 * (time.perf_counter() - start))
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(model.tasks()), "batches": batcher.batches}

    @app.get("/tasks")
    async def tasks() -> list[dict[str, Any]]:
        return [task_info(model, n) for n in model.tasks()]

    @app.post("/predict")
    async def predict(
        task: Annotated[str, Form()], file: Annotated[UploadFile, File()], top_k: Annotated[int, Form()] = 5
    ):
        if task not in model.tasks():
            return error(404, f"unknown task {task!r}; known tasks: {', '.join(model.tasks())}")
        if not (file.content_type or "").startswith("image/"):
            return error(415, f"file has content type {file.content_type!r}; upload an image (image/png, image/jpeg)")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            return error(413, f"image larger than the limit of {max_bytes} bytes (--max-upload-mb)")
        try:
            image = preprocess(data, task)
        except Exception as e:  # PIL raises several types for bad bytes
            return error(400, f"cannot decode the uploaded file as an image ({type(e).__name__}: {str(e)[:100]})")
        probs = await batcher.submit(image, task)
        top = probs.topk(max(1, min(top_k, len(probs))))
        labels = class_names(model, task)
        return {"task": task, "top": [{"label": labels[i], "index": i, "prob": p} for p, i in
                                      zip(top.values.tolist(), top.indices.tolist())]}

    return app


def load_tasks(model: MultiTaskModel, specs: list[str], folder: str | None) -> None:
    """Attaches ``name=path`` specs and each ``<folder>/<name>/delta.safetensors`` or ``<folder>/<name>.safetensors``"""
    pairs = [_spec(s) for s in specs]
    if folder:
        root = Path(folder)
        if not root.is_dir():
            raise DeltaTuneError(f"--tasks-dir {folder!r} is not a folder of delta files")
        pairs += [(p.parent.name, p) for p in sorted(root.glob("*/delta.safetensors"))]
        pairs += [(p.stem, p) for p in sorted(root.glob("*.safetensors"))]
    if not pairs:
        raise DeltaTuneError("serve: no tasks; pass --task name=path, --tasks-dir DIR, or --demo after deltatune demo")
    for name, path in pairs:
        model.add_task(name, path)
        LOG.info("task %s: %s", name, path)


def _spec(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise DeltaTuneError(f"--task takes name=path, got {text!r}")
    return name, Path(path)


def first_head_classes(specs: list[str], folder: str | None) -> int:
    """The class count of the first task's head, to build the backbone (each task's head replaces it)."""
    from deltatune import read_metadata

    paths = [_spec(s)[1] for s in specs] + sorted(Path(folder or "/nonexistent").glob("*/delta.safetensors"))
    paths += sorted(Path(folder or "/nonexistent").glob("*.safetensors"))
    if not paths:
        return 1
    meta = read_metadata(paths[0])
    shape = meta["backbone_shapes"].get(f"{meta.get('head')}.weight")
    return int(shape[0]) if shape else 1


def add_parser(sub: Any) -> None:
    """``deltatune serve``'s options."""
    p = sub.add_parser("serve", help="serve delta files from one backbone over HTTP (batched across tasks)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deltatune_offline_vit", help="backbone, as deltatune train names it")
    p.add_argument("--task", action="append", default=[], metavar="NAME=PATH", help="a task's delta file (repeat)")
    p.add_argument("--tasks-dir", help="folder of <name>/delta.safetensors or <name>.safetensors files")
    p.add_argument("--demo", action="store_true", help=f"serve what deltatune demo wrote ({DEMO_DIR}/<method>)")
    p.add_argument("--checkpoint", help="local weight file of the backbone")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random backbone weights")
    p.add_argument("--img-size", type=int, help="input resolution of the backbone")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="most requests per batch (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (default 5 ms)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload (default 10 MB)")
    p.set_defaults(func=run_server)


def build_model(ns: argparse.Namespace) -> MultiTaskModel:
    """The backbone and its tasks, from the command line (a refused delta file stops here, naming it)."""
    from deltatune.backbones import create_backbone

    if ns.demo:
        ns.model, ns.tasks_dir = "deltatune_offline_vit", ns.tasks_dir or DEMO_DIR
        if not Path(ns.tasks_dir).is_dir():
            raise DeltaTuneError(f"serve --demo: no {ns.tasks_dir}/; run `deltatune demo` first")
    classes = first_head_classes(ns.task, ns.tasks_dir)
    backbone = create_backbone(ns.model, classes, ns.pretrained, ns.checkpoint, ns.img_size).eval()
    model = MultiTaskModel(backbone)
    load_tasks(model, ns.task, ns.tasks_dir)
    return model


def run_server(ns: argparse.Namespace) -> int:
    """``deltatune serve``: builds the model, then runs uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise DeltaTuneError('deltatune serve needs FastAPI and uvicorn: pip install "deltatune[serve]"') from e
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = build_model(ns)
    app = create_app(model, ns.max_batch, ns.max_wait_ms, int(ns.max_upload_mb * (1 << 20)))
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")
    return 0
