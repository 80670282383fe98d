"""`readapt serve`: real HTTP on a free localhost port. Health, predictions equal to `readapt predict`'s, class
probabilities, every bad request (4xx JSON naming the problem), 32 simultaneous requests sharing batches, a model
failure that stays with its request, the queue limit (503), SIGTERM with a request in flight, the command's
errors; the dynamic batcher on its own. Tiny random BERT / T5 backbones with the real BERT tokenizer
(conftest.tiny_models) and READ adapters with random weights (what they predict does not matter here, only
that the server gives what Predictor gives)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from readapt import ReadConfig, get_read_model
from readapt.inference import Predictor, run_predict
from readapt.io import atomic_write_json
from readapt.pretrained import load_backbone
from readapt.serving.__main__ import main as serve_main
from readapt.serving.app import create_app
from readapt.serving.batcher import DynamicBatcher, QueueFull
from readapt.serving.command import listening_socket
from readapt.serving.settings import ServeSettings
from readapt.task_spec import TASK_FILE, TaskSpec
from readapt.tasks import get_task

REPO_SRC = Path(__file__).resolve().parents[1] / "src"
ROWS = [
    {"sentence": "a gripping, funny film", "sentence1": "A man plays.", "sentence2": "Someone plays.",
     "premise": "The cat sat.", "hypothesis": "A cat is sitting."},
    {"sentence": "dull and far too long", "sentence1": "It rains.", "sentence2": "The sun shines.",
     "premise": "He left early.", "hypothesis": "He stayed."},
    {"sentence": "great cast", "sentence1": "Cats sleep.", "sentence2": "Cats are sleeping.",
     "premise": "Two dogs run.", "hypothesis": "Animals move."},
    {"sentence": "I walked out", "sentence1": "A", "sentence2": "B", "premise": "x", "hypothesis": "y"},
    {"sentence": "worth seeing twice, \"really\"", "sentence1": "x, y", "sentence2": "z",
     "premise": "Snow fell all night long in the old town by the river.", "hypothesis": "It snowed."},
]
ADAPTERS = {"sst2": "sst2", "cola": "cola", "stsb": "stsb", "mnli": "mnli"}  # adapter name -> GLUE task


def save_random_adapter(backbone: Path, task_name: str, directory: Path, seed: int, text_to_text: bool = False) -> Path:
    """A READ adapter with every trainable weight drawn at random (a trained one costs and serves the same),
    saved with its task file as `readapt train` saves it."""
    task = get_task(task_name)
    loaded = load_backbone(str(backbone), task.num_labels, task.is_regression)
    model = get_read_model(loaded.model, ReadConfig(hidden_size=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(directory)
    atomic_write_json(directory / TASK_FILE, TaskSpec(task, 32, text_to_text).to_dict())
    return directory


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """sst2 and cola read `sentence` (one shared pass), stsb `sentence1, sentence2`, mnli `premise, hypothesis`."""
    root = tmp_path_factory.mktemp("serve")
    return {name: save_random_adapter(tiny_models["bert"], task, root / name, seed)
            for seed, (name, task) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def predictor(adapters, tiny_models) -> Predictor:
    return Predictor(list(adapters.values()), model=str(tiny_models["bert"]), names=list(adapters), cpu=True)


@contextlib.contextmanager
def running(app):
    """uvicorn serving `app` in a thread on a free localhost port; yields the base URL."""
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


SETTINGS = ServeSettings(batch_window_ms=30, max_batch_rows=64, max_request_rows=8, max_body_bytes=4096)


@pytest.fixture(scope="module")
def url(predictor):
    with running(create_app(predictor, SETTINGS)) as base:
        yield base


def post(base: str, payload=None, content: bytes | None = None, client: httpx.Client | None = None,
         **kwargs) -> httpx.Response:
    if client is None:
        return httpx.post(f"{base}/predict", json=payload, content=content, timeout=60, **kwargs)
    return client.post(f"{base}/predict", json=payload, content=content, **kwargs)


def reference(predictor: Predictor, rows: list[dict], names: list[str]) -> list[dict]:
    """What the server should answer: Predictor on the same rows, as one batch."""
    predictions, _ = predictor.predict_with_scores(rows, names=names)
    return [{name: predictions[name][i] for name in names} for i in range(len(rows))]


def assert_same_predictions(answer: list[dict], expected: list[dict]) -> None:
    """Labels exactly; regression values to float rounding (a row padded to another batch's length runs other
    matrix shapes)."""
    assert len(answer) == len(expected)
    for got, want in zip(answer, expected, strict=True):
        assert list(got) == list(want)
        for name, value in want.items():
            assert got[name] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value), name


# ------------------------------------------------------------------------------------------- answers
def test_health_lists_the_adapters(url):
    response = httpx.get(f"{url}/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    by_name = {a["name"]: a for a in health["adapters"]}
    assert list(by_name) == list(ADAPTERS)
    assert by_name["sst2"] == {"name": "sst2", "task": "sst2", "type": "classification",
                               "labels": ["negative", "positive"], "columns": ["sentence"]}
    assert by_name["mnli"]["labels"] == ["entailment", "neutral", "contradiction"]
    assert by_name["stsb"]["type"] == "regression" and by_name["stsb"]["labels"] is None
    assert health["groups"] == [["sst2", "cola"], ["stsb"], ["mnli"]]  # three backbone passes per batch
    assert health["settings"]["max_request_rows"] == 8


def test_predictions_equal_readapt_predict(url, adapters, tiny_models, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    run_predict(list(adapters.values()), tmp_path / "in.jsonl", tmp_path / "out.jsonl", model=str(tiny_models["bert"]),
                names=list(adapters), cpu=True, progress=False)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    response = post(url, {"inputs": ROWS})
    assert response.status_code == 200, response.text
    # the same rows in one batch: the same padding, so bit for bit what `readapt predict` wrote
    assert response.json() == {"predictions": [{name: record[name] for name in ADAPTERS} for record in written]}
    assert len({p["stsb"] for p in response.json()["predictions"]}) == len(ROWS)  # answers that depend on the row

    # a subset of adapters, in the order asked for; the rows need only their columns. Three rows pad to
    # another length than five: regression values agree to float rounding
    rows = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "sentence": r["sentence"]} for r in ROWS[:3]]
    response = post(url, {"inputs": rows, "adapters": ["stsb", "sst2"]})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"],
                            [{"stsb": record["stsb"], "sst2": record["sst2"]} for record in written[:3]])


def test_scores_are_the_class_probabilities(url, predictor):
    response = post(url, {"inputs": ROWS[:3], "adapters": ["mnli", "stsb", "sst2"], "scores": True})
    assert response.status_code == 200, response.text
    body = response.json()
    _, expected = predictor.predict_with_scores(ROWS[:3], names=["mnli", "stsb", "sst2"])
    for row, (prediction, scores) in enumerate(zip(body["predictions"], body["scores"], strict=True)):
        assert list(scores) == ["mnli", "sst2"]  # regression has no class probabilities
        for name, probabilities in scores.items():
            assert probabilities == expected[name][row]
            assert sum(probabilities.values()) == pytest.approx(1, abs=1e-6)
            assert max(probabilities, key=probabilities.get) == prediction[name]
    assert "scores" not in post(url, {"inputs": ROWS[:1]}).json()


def test_text_to_text_scores_rank_the_candidate_answers(tiny_models, tmp_path):
    """On an encoder-decoder the class probabilities are the softmax over the candidate answers' log-likelihoods."""
    directory = save_random_adapter(tiny_models["t5"], "sst2", tmp_path / "t5-sst2", seed=3, text_to_text=True)
    t5 = Predictor([directory], model=str(tiny_models["t5"]), cpu=True)
    predictions, scores = t5.predict_with_scores(ROWS)
    assert predictions == t5.predict_batch(ROWS)
    for label, probabilities in zip(predictions["t5-sst2"], scores["t5-sst2"], strict=True):
        assert set(probabilities) == {"negative", "positive"}
        assert sum(probabilities.values()) == pytest.approx(1, abs=1e-6)
        assert max(probabilities, key=probabilities.get) == label


# ------------------------------------------------------------------------------------------- bad requests
BAD_REQUESTS = {
    "not JSON": (b"{inputs: [}", 400, "the body is not valid JSON"),
    "not UTF-8": (b'{"inputs": [{"sentence": "\xff"}]}', 400, "the body is not valid JSON"),
    "nested too deeply": (b"[" * 2000 + b"]" * 2000, 400, "not valid JSON"),
    "a JSON list": ([{"sentence": "x"}], 400, 'must be a JSON object {"inputs": [...]}, got a list'),
    "no inputs": ({"adapters": ["sst2"]}, 400, 'missing "inputs"'),
    "inputs not a list": ({"inputs": {"sentence": "x"}}, 400, '"inputs" must be a list of rows, got an object'),
    "inputs empty": ({"inputs": []}, 400, '"inputs" is empty'),
    "row not an object": ({"inputs": ["a film"], "adapters": ["sst2"]}, 400,
                          "inputs[0] must be an object"),
    "missing column": ({"inputs": [{"sentence": "x", "sentence1": "y"}], "adapters": ["sst2", "stsb"]}, 400,
                       "inputs[0]: no column 'sentence2', needed by adapter 'stsb' (reads sentence1, sentence2); "
                       "the row's columns are 'sentence', 'sentence1'"),
    "missing column, all adapters": ({"inputs": [{"sentence": "x"}]}, 400, "no column 'sentence1', needed by adapter 'stsb'"),
    "text not a string": ({"inputs": [{"sentence": 3}], "adapters": ["sst2"]}, 400,
                          "inputs[0]['sentence'] must be a string, got a number (3)"),
    "unknown adapter": ({"inputs": [{"sentence": "x"}], "adapters": ["sst2", "qnli"]}, 400,
                        "unknown adapter(s) 'qnli'; this server has 'sst2', 'cola', 'stsb', 'mnli'"),
    "adapters not a list": ({"inputs": [{"sentence": "x"}], "adapters": "sst2"}, 400,
                            '"adapters" must be a list of adapter names'),
    "adapters empty": ({"inputs": [{"sentence": "x"}], "adapters": []}, 400, '"adapters" is empty'),
    "adapter not a name": ({"inputs": [{"sentence": "x"}], "adapters": [1]}, 400, "adapters[0] must be an adapter name"),
    "scores not a boolean": ({"inputs": [{"sentence": "x"}], "adapters": ["sst2"], "scores": "yes"}, 400,
                             '"scores" must be true or false, got a string'),
    "unknown field": ({"input": [{"sentence": "x"}]}, 400, "unknown field(s) 'input'; the fields are inputs, adapters, scores"),
    "too many rows": ({"inputs": [{"sentence": "x"}] * 9, "adapters": ["sst2"]}, 413,
                      '"inputs" has 9 rows; this server takes at most 8 per request'),
    "too long a body": ({"inputs": [{"sentence": "x" * 5000}], "adapters": ["sst2"]}, 413,
                        "the body is longer than this server's limit of 4096 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_4xx_naming_the_problem(url, case):
    body, status, message = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = post(url, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and message in response.json()["error"], response.json()


def test_a_streamed_body_over_the_limit_is_refused(url):
    """Chunked (no Content-Length): the limit holds while the body streams in."""
    def chunks():
        yield b'{"inputs": [{"sentence": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    response = post(url, content=chunks())
    assert response.status_code == 413 and "limit of 4096 bytes" in response.json()["error"]


def test_unknown_paths_and_methods_get_json_errors(url):
    missing = httpx.get(f"{url}/nowhere")
    assert missing.status_code == 404 and "the endpoints are GET /health and POST /predict" in missing.json()["error"]
    wrong = httpx.get(f"{url}/predict")
    assert wrong.status_code == 405 and wrong.json()["error"].startswith("GET /predict: Method Not Allowed")


# ------------------------------------------------------------------------------------------- load and failures
def _simultaneously(base: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at once (threads with their clients ready, released together by a barrier)."""
    barrier = threading.Barrier(len(bodies))
    clients = [httpx.Client(timeout=60) for _ in bodies]

    def run(index: int) -> httpx.Response:
        barrier.wait()
        return post(base, bodies[index], client=clients[index])

    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(run, range(len(bodies))))
    finally:
        for client in clients:
            client.close()


def test_32_simultaneous_requests_share_batches_and_are_answered_right(url, predictor):
    served_before = httpx.get(f"{url}/health").json()["served"]
    subsets = [["sst2"], ["stsb", "cola"], ["mnli"], list(ADAPTERS), ["cola", "sst2", "mnli"]]
    requests = []
    for i in range(32):
        rows = [ROWS[(i + k) % len(ROWS)] for k in range(1 + i % 3)]
        requests.append({"inputs": rows, "adapters": subsets[i % len(subsets)], "scores": i % 2 == 0})
    bad = {5, 17, 29}  # a missing column: refused alone, the batch goes on without them
    for i in bad:
        requests[i] = {"inputs": [{"sentence": "only this"}], "adapters": ["stsb"]}
    responses = _simultaneously(url, requests)
    for i, (body, response) in enumerate(zip(requests, responses, strict=True)):
        if i in bad:
            assert response.status_code == 400 and "needed by adapter 'stsb'" in response.json()["error"]
            continue
        assert response.status_code == 200, (i, response.text)
        assert_same_predictions(response.json()["predictions"], reference(predictor, body["inputs"], body["adapters"]))
        assert ("scores" in response.json()) is body["scores"]
    served = httpx.get(f"{url}/health").json()["served"]
    answered = served["requests"] - served_before["requests"]
    batches = served["batches"] - served_before["batches"]
    assert answered == 32 - len(bad)
    assert batches < answered, "no two requests shared a backbone pass"


def test_a_model_failure_stays_with_its_request(url, predictor, monkeypatch):
    original = predictor.predict_with_scores

    def failing(rows, names=None, shared=True):
        if any(row.get("sentence") == "boom" for row in rows):
            raise RuntimeError("the model cannot take 'boom'")
        return original(rows, names=names, shared=shared)

    monkeypatch.setattr(predictor, "predict_with_scores", failing)
    good = {"inputs": ROWS[:2], "adapters": ["sst2", "stsb"]}
    failed, *answered = _simultaneously(url, [{"inputs": [{"sentence": "boom"}], "adapters": ["sst2"]}, good, good])
    assert failed.status_code == 500
    assert failed.json() == {"error": "prediction failed inside the model: RuntimeError: the model cannot take 'boom'"}
    expected = reference(predictor, good["inputs"], good["adapters"])
    for response in answered:
        assert response.status_code == 200
        assert_same_predictions(response.json()["predictions"], expected)
    assert post(url, good).status_code == 200  # and the server goes on


def test_a_full_queue_answers_503(predictor, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = predictor.predict_with_scores

    def gated(rows, names=None, shared=True):
        entered.set()
        assert release.wait(30)
        return original(rows, names=names, shared=shared)

    monkeypatch.setattr(predictor, "predict_with_scores", gated)
    body = {"inputs": ROWS[:1], "adapters": ["sst2"]}
    with running(create_app(predictor, ServeSettings(batch_window_ms=0, queue_limit=1))) as base, \
            ThreadPoolExecutor(2) as pool:
        running_request = pool.submit(post, base, body)
        assert entered.wait(30)  # the first request is in the model
        waiting_request = pool.submit(post, base, body)
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = post(base, body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "the server is busy: 1 requests are already waiting for the model (queue limit 1)" in refused.json()["error"]
        release.set()
        assert running_request.result().status_code == 200 and waiting_request.result().status_code == 200
        assert httpx.get(f"{base}/health").json()["served"]["refused"] == 1


# ------------------------------------------------------------------------------------------- the command
def _environment() -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_SRC), os.environ.get("PYTHONPATH", "")]),
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    return environment


def test_sigterm_lets_the_request_in_flight_finish(adapters, tiny_models, predictor):
    command = [sys.executable, "-m", "readapt.serving", "--adapter", str(adapters["sst2"]), "--model",
               str(tiny_models["bert"]), "--port", "0", "--batch-window-ms", "1500", "--log-level", "warning", "--cpu"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_environment())
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "listening on http://" in line:
                break
        else:
            pytest.fail("the server never listened:\n" + "".join(lines))
        base = line.split("listening on ")[1].strip()
        assert "1 adapter(s) (sst2)" in line and "1 backbone pass(es) per batch" in line
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, base, {"inputs": ROWS[:2]})
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/health").json()["queue"]["waiting"] < 1:  # it waits out the 1.5 s window
                assert time.monotonic() < deadline
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            response = in_flight.result(timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == reference(predictor, ROWS[:2], ["sst2"])
        assert process.wait(timeout=60) == 0
        assert "readapt serve: stopped" in process.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_command_errors_are_one_line_before_the_model_loads(adapters, tmp_path, capsys):
    base = ["--adapter", str(adapters["sst2"]), "--port", "0", "--cpu"]
    assert serve_main([*base, "--max-batch-rows", "8", "--max-request-rows", "16"]) == 2
    assert capsys.readouterr().err.strip() == ("readapt: error: --max-request-rows=16 exceeds --max-batch-rows=8; "
                                               "a request must fit in one batch")
    with listening_socket("127.0.0.1", 0) as taken:
        taken.listen()
        assert serve_main([*base[:2], "--port", str(taken.getsockname()[1])]) == 2
        assert "readapt: error: cannot listen on 127.0.0.1:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert serve_main(["--adapter", str(tmp_path / "empty"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("readapt: error: ") and "empty" in err
    with pytest.raises(SystemExit):
        serve_main([*base, "--batch-window-ms", "-1"])
    assert "must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the batcher
def test_batcher_windows_row_limit_queue_limit_and_errors():
    calls: list[list] = []

    def run_batch(items):
        calls.append(list(items))
        return [ValueError(item) if item == "bad" else item.upper() for item in items]

    async def scenario():
        batcher = DynamicBatcher(run_batch, window_s=0.05, max_batch_rows=4, queue_limit=3)
        batcher.start()
        try:
            # three requests within the window: one model call
            assert await asyncio.gather(*(batcher.submit(x, 1) for x in "abc")) == ["A", "B", "C"]
            assert calls == [["a", "b", "c"]]
            # a fourth request over the queue limit is refused at once; the row limit splits the rest
            tasks = [asyncio.ensure_future(batcher.submit(x, 2)) for x in ("d", "e", "f")]
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):
                await batcher.submit("g", 1)
            assert await asyncio.gather(*tasks) == ["D", "E", "F"]
            assert calls[1:] == [["d", "e"], ["f"]]
            # an exception result goes to its own submitter only
            results = await asyncio.gather(batcher.submit("bad", 1), batcher.submit("ok", 1), return_exceptions=True)
            assert isinstance(results[0], ValueError) and results[1] == "OK"
            assert batcher.stats.batches == 4 and batcher.stats.requests == 8 and batcher.stats.refused == 1
        finally:
            await batcher.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------- the real backbone
@pytest.mark.slow
def test_default_backbone_serves_what_predictor_gives(tmp_path):
    """all-MiniLM-L6-v2 with two random READ adapters of the default config (SST-2, STS-B): the server's answers
    to simultaneous requests are those of Predictor."""
    from readapt.pretrained import embedded_backbone_dir

    folders = {}
    for seed, task_name in enumerate(("sst2", "stsb")):
        task = get_task(task_name)
        model = get_read_model(load_backbone(None, task.num_labels, task.is_regression).model, ReadConfig())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        folders[task_name] = tmp_path / task_name
        model.save_pretrained(folders[task_name])
        atomic_write_json(folders[task_name] / TASK_FILE, TaskSpec(task, 128, False).to_dict())
    assert embedded_backbone_dir().is_dir()
    served = Predictor(list(folders.values()), cpu=True)
    assert served.positions is None  # the default token mixer: every token corrected, as `readapt predict`
    with running(create_app(served, ServeSettings(batch_window_ms=20))) as base:
        bodies = [{"inputs": [ROWS[i % len(ROWS)], ROWS[(i + 2) % len(ROWS)]], "scores": True} for i in range(8)]
        responses = _simultaneously(base, bodies)
    reference_predictor = Predictor(list(folders.values()), cpu=True)
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_same_predictions(response.json()["predictions"],
                                reference(reference_predictor, body["inputs"], ["sst2", "stsb"]))

