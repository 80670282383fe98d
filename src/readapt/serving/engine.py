"""One batch of checked requests through `readapt.inference.Predictor`: per input recipe (Predictor's adapter
groups) one backbone pass over the rows of every request that asks for an adapter of that group, then each
request's answer cut back out. Runs in the model's worker thread; knows nothing about HTTP or asyncio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from readapt.inference import Predictor
from readapt.serving.validation import PredictRequest

log = logging.getLogger("readapt.serving")


class PredictionFailed(Exception):
    """The model failed on a request (not the request's fault as far as validation can tell): a 500."""


class BatchRunner:
    """Callable on a list of requests; returns, in the same order, each one's response body or the
    PredictionFailed it met. A batch that fails is retried one request at a time, so that a request the model
    cannot handle fails alone and the others of its batch are still answered."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def __call__(self, requests: Sequence[PredictRequest]) -> list[dict[str, Any] | PredictionFailed]:
        try:
            return list(self._together(requests))
        except Exception as exc:  # anything the model raises: the server must keep serving
            if len(requests) == 1:
                return [self._failure(exc)]
            log.warning("a batch of %d requests failed (%s: %s); retrying them one at a time",
                        len(requests), type(exc).__name__, exc)
        results: list[dict[str, Any] | PredictionFailed] = []
        for request in requests:
            try:
                results.extend(self._together([request]))
            except Exception as exc:
                results.append(self._failure(exc))
        return results

    @staticmethod
    def _failure(exc: Exception) -> PredictionFailed:
        log.error("prediction failed", exc_info=exc)
        return PredictionFailed(f"prediction failed inside the model: {type(exc).__name__}: {exc}")

    def _together(self, requests: Sequence[PredictRequest]) -> list[dict[str, Any]]:
        # answers[i][name]: request i's values of adapter `name`, one per row (scores likewise)
        answers: list[dict[str, list]] = [{} for _ in requests]
        scores: list[dict[str, list]] = [{} for _ in requests]
        for group in self.predictor.groups:
            members = [i for i, request in enumerate(requests) if any(n in request.adapters for n in group.names)]
            if not members:
                continue
            names = [n for n in group.names if any(n in requests[i].adapters for i in members)]
            rows = [row for i in members for row in requests[i].rows]
            predictions, probabilities = self.predictor.predict_with_scores(rows, names=names)
            start = 0
            for i in members:
                end = start + len(requests[i].rows)
                for name in names:
                    if name in requests[i].adapters:
                        answers[i][name] = predictions[name][start:end]
                        if requests[i].scores and name in probabilities:
                            scores[i][name] = probabilities[name][start:end]
                start = end
        return [self._response(request, answers[i], scores[i]) for i, request in enumerate(requests)]

    @staticmethod
    def _response(request: PredictRequest, answers: dict[str, list], scores: dict[str, list]) -> dict[str, Any]:
        rows = range(len(request.rows))
        body: dict[str, Any] = {"predictions": [{name: answers[name][row] for name in request.adapters}
                                                for row in rows]}
        if request.scores:  # class probabilities of the classification adapters asked for
            body["scores"] = [{name: scores[name][row] for name in request.adapters if name in scores}
                              for row in rows]
        return body
