"""`readapt serve`: READ adapters behind one HTTP endpoint, one backbone pass per batch.

app.py         the ASGI app (FastAPI): GET /health, POST /predict, JSON errors
validation.py  a /predict body checked before it joins a batch (a bad request never reaches the model)
batcher.py     dynamic batching: requests within a short window share one model call, in one worker thread
engine.py      a batch of requests through readapt.inference.Predictor (per input recipe, one backbone pass)
command.py     the command's flags and run (uvicorn; graceful shutdown on SIGTERM)
settings.py    the limits and batching settings

Run it with `readapt serve --adapter DIR ...` or `python -m readapt.serving --adapter DIR ...`; see
docs/serving.md.
"""
