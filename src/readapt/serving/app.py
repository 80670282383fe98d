"""The ASGI app (FastAPI): `GET /health` and `POST /predict` in front of a DynamicBatcher and a Predictor.

Every error is JSON {"error": "<one line>"}: 400 for a body that is not what /predict takes, 413 for too long a
body or too many rows, 404 / 405 for an unknown path or method, 503 when the queue is full (with Retry-After),
500 when the model fails on a request (the server goes on serving).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from readapt.inference import Predictor
from readapt.serving.batcher import DynamicBatcher, QueueFull, ShuttingDown
from readapt.serving.engine import BatchRunner, PredictionFailed
from readapt.serving.settings import ServeSettings
from readapt.serving.validation import RequestError, parse_predict_request


def adapter_catalog(predictor: Predictor) -> list[dict[str, Any]]:
    """What /health lists per adapter: name, task, kind, labels (null for regression / generation), columns."""
    catalog = []
    for entry in predictor.entries:
        task = entry.spec.task
        kind = "generation" if task.is_generation else "regression" if task.is_regression else "classification"
        catalog.append({"name": entry.name, "task": task.name, "type": kind,
                        "labels": list(task.label_names) if kind == "classification" else None,
                        "columns": list(entry.spec.input_columns)})
    return catalog


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to pass `limit` bytes (declared or streamed)."""
    too_long = RequestError(413, f"the body is longer than this server's limit of {limit} bytes "
                                 "(send fewer rows per request)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_long
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_long
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The app for a loaded Predictor. The batcher (and its model thread) lives from the app's startup to its
    shutdown; uvicorn's graceful shutdown answers in-flight requests before the shutdown runs."""
    settings = settings or ServeSettings()
    settings.check()
    catalog = adapter_catalog(predictor)
    columns = {entry["name"]: entry["columns"] for entry in catalog}

    def init_model_thread() -> None:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = DynamicBatcher(BatchRunner(predictor), window_s=settings.batch_window_ms / 1000,
                                 max_batch_rows=settings.max_batch_rows, queue_limit=settings.queue_limit,
                                 thread_initializer=init_model_thread)
        batcher.start()
        app.state.batcher = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="readapt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown path, wrong method
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; the endpoints are GET /health and POST /predict"
        return _error(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        batcher: DynamicBatcher = request.app.state.batcher
        return {"status": "ok", "model": predictor.source, "device": str(predictor.device), "adapters": catalog,
                "groups": [group.names for group in predictor.groups],  # = backbone passes per batch
                "settings": dataclasses.asdict(settings),
                "queue": {"waiting": batcher.waiting, "running_rows": batcher.running_rows},
                "served": dataclasses.asdict(batcher.stats)}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await read_body(request, settings.max_body_bytes)
        parsed = parse_predict_request(body, columns, settings.max_request_rows)
        batcher: DynamicBatcher = request.app.state.batcher
        try:
            return JSONResponse(await batcher.submit(parsed, rows=len(parsed.rows)))
        except QueueFull as exc:
            return _error(503, f"the server is busy: {exc} (queue limit {settings.queue_limit}); retry shortly",
                          {"Retry-After": "1"})
        except ShuttingDown as exc:
            return _error(503, str(exc), {"Retry-After": "1"})
        except PredictionFailed as exc:
            return _error(500, str(exc))

    return app
