"""Feature cache (readapt.read.cache) and low-precision frozen backbones.

Tolerances, and why:
- float32 cache, same batches: bit for bit (losses and gradients). The cache replays the exact values the
  build computed, and zeros at padded positions change nothing on real tokens.
- float32 cache over shuffled epochs: relative 1e-5 per step. The cache is built in other batches than the
  live epochs use, and the backbone's CPU kernels are not batch-invariant: a token's state moves in the last
  bits with the padding and neighbours of its batch (measured: up to 3e-6 absolute on all-MiniLM-L6-v2).
- float16 / bfloat16 cache: relative 2e-3 / 1e-2 per step, about 4x / 2.5x the unit roundoff of the stored
  values (2^-11 / 2^-8): the loss is a smooth function of them, and a handful of AdamW steps does not amplify
  such a perturbation by orders of magnitude.
- bfloat16 backbone on a real task: dev accuracy within 3 points of float32 (slow test, 400 dev sentences: its
  rounding shifts every hidden state by up to 2^-8 relative, enough to flip a few borderline predictions, and
  3 points is about 1.2 standard errors of an accuracy near 0.6 on 400 sentences).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_GLUE_DIR, REPO_ROOT, needs_real_glue
from readapt.cli import main
from readapt.encoding import Collator
from readapt.errors import ConfigError
from readapt.pretrained import load_backbone
from readapt.read.cache import FeatureCache
from readapt.read.config import ReadConfig
from readapt.read.model import get_read_model
from readapt.read.side_network import second_text_start
from readapt.recipe import DataConfig, TrainingConfig, train

WORDS = ("good", "bad", "fine", "awful", "great", "terrible", "movie", "plot", "actor", "scene", "boring", "fun", "long",
         "short")


def _write_task(folder: Path, train_rows: int = 40, dev_rows: int = 20, pairs: bool = False) -> tuple[Path, Path]:
    rng = random.Random(0)
    paths = []
    for name, rows in (("train", train_rows), ("dev", dev_rows)):
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(rows):
                row = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 15))), "label": ["neg", "pos"][i % 2]}
                if pairs:
                    row["text2"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def _config(tmp_path: Path, model: Path, pairs: bool = False, **overrides) -> TrainingConfig:
    train_file, dev_file = _write_task(tmp_path, pairs=pairs)
    columns = ["text", "text2"] if pairs else ["text"]
    settings = dict(
        data=DataConfig(train_file=str(train_file), validation_file=str(dev_file), text_columns=columns),
        model=str(model), epochs=2, batch_size=8, eval_batch_size=16, max_length=32, progress=False,
        output_dir=str(tmp_path / "run"), overwrite=True, cache_dir=str(tmp_path / "cache"),
        method_options={"hidden_size": 16},
        decoder_head="classifier",  # the tiny Llama is a classification model; cached label words are refused
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


def _train_losses(config: TrainingConfig, losses: list[float]) -> tuple[list[float], dict]:
    losses.clear()
    metrics = train(config)
    return list(losses), metrics


# ---------------------------------------------------------------------------------------------- exactness
def _read_model(folder: Path, config: ReadConfig):
    loaded = load_backbone(str(folder), num_labels=2, decoder_head="classifier")  # the Llama: a classification head
    model = get_read_model(loaded.model, config)
    torch.manual_seed(3)
    for side in model.read.values():  # a trained-looking side network: the correction is not zero
        torch.nn.init.normal_(side.up_projection.weight, std=0.2)
    return model, loaded


def _features(loaded, count: int = 11, pairs: bool = False) -> list[dict]:
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(count)]
    if pairs:  # every other row a pair of texts
        ids = [loaded.tokenizer(text, *([" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))] if i % 2 else []),
                                truncation=True, max_length=24).input_ids for i, text in enumerate(texts)]
    else:
        ids = loaded.tokenizer(texts, truncation=True, max_length=24).input_ids
    if loaded.text_to_text:
        targets = loaded.tokenizer([rng.choice(["positive", "negative sentiment"]) for _ in texts]).input_ids
        return [{"input_ids": i, "labels": t} for i, t in zip(ids, targets, strict=True)]
    return [{"input_ids": i, "labels": rng.randint(0, 1)} for i in ids]


def _gradients(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("kind,options", [("bert", {}), ("t5", {}), ("llama", {}), ("t5", {"h0": "embeddings"}),
                                          ("bert", {"h0": "embeddings", "rnn_type": "lstm"})])
def test_replay_on_the_same_batches_is_bit_exact(kind, options, tiny_models, tmp_path):
    model, loaded = _read_model(tiny_models[kind], ReadConfig(hidden_size=16, **options))
    features = _features(loaded)
    collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, False)
    cache = FeatureCache(model, loaded.tokenizer, max_length=24, text_to_text=loaded.text_to_text,
                         directory=tmp_path, dtype="float32")
    inputs = [f["input_ids"] for f in features]
    calls = ([("encoder", inputs), ("decoder", [f["labels"] for f in features])] if loaded.text_to_text
             else [(model.adapted_stacks[0].name, inputs)])
    plan = cache.plan("train", calls)
    entry = cache.open_or_build(plan, lambda batch: model(**batch), features, collator, batch_size=4, device="cpu",
                                sort_by_length=False)
    model.train()
    for start in range(0, len(features), 4):  # the build's batches: same composition, same padding
        rows = list(range(start, min(start + 4, len(features))))
        batch = collator([features[i] for i in rows])
        torch.manual_seed(start)  # the same dropout masks in the (training) head
        live = model(**batch).loss
        live.backward()
        live_gradients = _gradients(model)
        model.zero_grad()
        torch.manual_seed(start)
        with model.replaying(entry.batch(rows)):
            cached = model(**batch).loss
        cached.backward()
        assert torch.equal(live, cached)
        assert all(torch.equal(a, b) for a, b in zip(live_gradients, _gradients(model), strict=True))
        model.zero_grad()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_entry_files_are_never_memory_mapped_and_an_unpickled_entry_reads_the_same(tiny_models, tmp_path):
    """The cache is written and read by position: a memory map would put every page an epoch touches into the
    process's resident set, and its peak RSS would then measure the cache's size, not training's memory."""
    import pickle

    model, loaded = _read_model(tiny_models["bert"], ReadConfig(hidden_size=16))
    features = _features(loaded)
    collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, False)
    cache = FeatureCache(model, loaded.tokenizer, max_length=24, text_to_text=False, directory=tmp_path,
                         dtype="float16")
    plan = cache.plan("train", [(model.adapted_stacks[0].name, [f["input_ids"] for f in features])])
    entry = cache.open_or_build(plan, lambda batch: model(**batch), features, collator, batch_size=4, device="cpu",
                                sort_by_length=False)
    rows = [0, 3, 5]
    states = entry.batch(rows).calls[0].states
    assert states.abs().sum() > 0
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    again = pickle.loads(pickle.dumps(entry))  # as a DataLoader worker gets it: the descriptor reopened
    assert torch.equal(again.batch(rows).calls[0].states, states)
    again.files[0].close()
    alone = again.batch(rows[:1]).calls[0].states  # padded to row 0's own length
    assert torch.equal(alone, states[:, :1, : alone.shape[2]])


@pytest.mark.parametrize("options", [{"sequence_context": "none"}, {"sequence_context": "pooled"},
                                     {"sequence_context": "segments"},
                                     {"h0": "embeddings", "rnn_type": "lstm"}])  # the default context: "segments" here
def test_first_token_replay_equals_the_full_correction(options, tiny_models, tmp_path):
    """A BERT head reads [CLS]: replaying position 0 only (and, for the pooled context, each layer's mean over the
    example's tokens) with the model correcting [CLS] alone gives the loss and gradients of the live model with
    the full correction (float32 cache; to float rounding: the matrix products run on fewer rows)."""
    model, loaded = _read_model(tiny_models["bert"], ReadConfig(hidden_size=16, token_mixer_layers=0, **options))
    features = _features(loaded, pairs=True)
    collator = Collator(loaded.tokenizer.pad_token_id, False, False)
    cache = FeatureCache(model, loaded.tokenizer, max_length=24, text_to_text=False, directory=tmp_path, dtype="float32")
    plan = cache.plan("train", [(model.adapted_stacks[0].name, [f["input_ids"] for f in features])])
    entry = cache.open_or_build(plan, lambda batch: model(**batch), features, collator, batch_size=4, device="cpu")
    model.eval()  # no dropout in the head: the two passes must see the same function
    for start in range(0, len(features), 4):
        rows = list(range(start, min(start + 4, len(features))))
        batch = collator([features[i] for i in rows])
        live = model(**batch).loss
        live.backward()
        live_gradients = _gradients(model)
        model.zero_grad()
        context = model.read_config.sequence_context
        starts = None
        if context == "segments":
            starts = np.array([second_text_start(f["input_ids"], model.read_config.separator_token_id) for f in features])
            assert (starts < [len(f["input_ids"]) for f in features]).any()  # some rows are pairs
        replay = entry.batch(rows, first_token=True, pooled=context in ("pooled", "segments"), second_text_starts=starts)
        assert replay.calls[0].states.shape[2] == 1
        with model.correcting_positions(slice(0, 1)), model.replaying(replay):
            cached = model(**batch).loss
        cached.backward()
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
        for got, want in zip(_gradients(model), live_gradients, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        model.zero_grad()


@pytest.mark.parametrize("context", ["pooled", "segments"])
def test_training_corrects_cls_alone_with_the_losses_of_the_full_correction(context, tiny_models, tmp_path, step_losses,
                                                                            monkeypatch):
    """The training loop finds that the BERT head reads [CLS] only and corrects that position alone (recorded in
    metrics.json); the losses are those of a run that corrects every token. T5 and a decoder-only head: every token.
    ("segments": on pairs of texts.)"""
    from readapt.recipe.steps import TrainRecipe

    config = _config(tmp_path, tiny_models["bert"], pairs=context == "segments",
                     method_options={"hidden_size": 16, "sequence_context": context, "token_mixer_layers": 0})
    first, metrics = _train_losses(config, step_losses)
    assert metrics["read_corrected_positions"].startswith("first token")
    monkeypatch.setattr(TrainRecipe, "_corrects_first_token_only", lambda *args: False)
    every, every_metrics = _train_losses(config, step_losses)
    assert every_metrics["read_corrected_positions"] == "every token"
    assert first == pytest.approx(every, rel=1e-5)
    monkeypatch.undo()
    if context == "segments":
        return
    for kind in ("t5", "llama"):
        _, metrics = _train_losses(_config(tmp_path, tiny_models[kind]), step_losses)
        assert metrics["read_corrected_positions"] == "every token", kind


@pytest.mark.parametrize("kind", ["bert", "bert-pooled", "bert-pairs", "t5", "llama"])
def test_training_from_float32_cache_matches_live(kind, tiny_models, tmp_path, step_losses):
    """("bert": the default context, "segments", on single texts; "bert-pairs": on pairs of texts)"""
    config = _config(tmp_path, tiny_models[kind.split("-")[0]], pairs=kind == "bert-pairs", cache_dtype="float32",
                     cache_features=False)
    if kind == "bert-pooled":
        config.method_options = {"hidden_size": 16, "sequence_context": "pooled"}
    live, live_metrics = _train_losses(config, step_losses)
    config.cache_features = True
    cached, metrics = _train_losses(config, step_losses)
    assert len(live) == len(cached) == 10  # 2 epochs x 5 shuffled batches
    assert cached == pytest.approx(live, rel=1e-5)
    assert [e["dev"] for e in metrics["epochs"]] == [e["dev"] for e in live_metrics["epochs"]]
    cache = metrics["feature_cache"]
    assert cache["dtype"] == "float32" and not cache["reused"] and cache["bytes"] > 0
    assert set(cache["entries"]) == {"train", "dev validation"}
    assert metrics["epochs"][0]["epoch_train_seconds"] >= cache["build_seconds"]  # building counts as epoch 1
    assert 0 < cache["build_cpu_seconds"] <= metrics["epochs"][0]["epoch_train_cpu_seconds"]
    assert cache["build_cpu_seconds"] == pytest.approx(sum(e["build_cpu_seconds"] for e in cache["entries"].values()))
    assert live_metrics["feature_cache"] is None


@pytest.mark.parametrize("dtype,tolerance", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_low_precision_cache_within_rounding(dtype, tolerance, tiny_models, tmp_path, step_losses):
    config = _config(tmp_path, tiny_models["t5"], cache_dtype="float32", cache_features=True)
    exact, exact_metrics = _train_losses(config, step_losses)
    config.cache_dtype = dtype
    rounded, metrics = _train_losses(config, step_losses)
    assert rounded == pytest.approx(exact, rel=tolerance)
    assert metrics["feature_cache"]["bytes"] < 0.6 * exact_metrics["feature_cache"]["bytes"]


def test_dev_predictions_from_cache_equal_live(tiny_models, tmp_path):
    from readapt.recipe import DevEvaluator, predict, replaying_batch
    from readapt.recipe.cache_jobs import CacheJobs
    from readapt.tasks import load_custom_task

    for kind in ("bert", "t5"):
        model, loaded = _read_model(tiny_models[kind], ReadConfig(hidden_size=16))
        config = _config(tmp_path, tiny_models[kind], cache_features=True, cache_dtype="float32")
        task, splits = load_custom_task(config.data.train_file, config.data.validation_file, ["text"], "label")

        class CPU:
            device = torch.device("cpu")

            @staticmethod
            def prepare(loader):
                return loader

            @staticmethod
            def unwrap_model(model):
                return model

        live = DevEvaluator.build(task, {"validation": splits["validation"]}, loaded, 32, 8, CPU)
        jobs = CacheJobs(config, model, loaded)
        cached = DevEvaluator.build(task, {"validation": splits["validation"]}, loaded, 32, 8, CPU, jobs)
        jobs.build(model, CPU, batch_size=8, progress=False)
        expected = predict(model, live.loaders["validation"], task, live.candidates)
        assert predict(model, cached.loaders["validation"], task, cached.candidates) == expected
        # and the scores behind the predictions (the cache was built in other batches: float32 rounding)
        for live_batch, cached_batch in zip(live.loaders["validation"], cached.loaders["validation"], strict=True):
            with torch.no_grad(), replaying_batch(model, cached_batch):
                got = _scores(model, cached_batch, cached.candidates)
            with torch.no_grad():
                want = _scores(model, live_batch, live.candidates)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _scores(model, batch, candidates):
    from readapt.answers import candidate_scores

    if candidates is not None:
        return candidate_scores(model, batch, candidates)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------- fingerprint and reuse
def _key(folder: Path, tmp_path: Path, *, tokenizer=None, texts=("a good movie", "boring plot"), max_length=32,
         dtype="float16", config: ReadConfig | None = None, perturb=None) -> str:
    loaded = load_backbone(str(folder), num_labels=2, decoder_head="classifier")
    if perturb is not None:
        perturb(loaded.model)
    model = get_read_model(loaded.model, config or ReadConfig())
    tokenizer = tokenizer or loaded.tokenizer
    ids = tokenizer(list(texts), truncation=True, max_length=max_length).input_ids
    cache = FeatureCache(model, tokenizer, max_length=max_length, text_to_text=False, directory=tmp_path, dtype=dtype)
    return cache.plan("train", [("encoder", ids)]).key


def test_fingerprint_follows_weights_tokenizer_data_and_settings(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_models["bert"]
    base = _key(folder, tmp_path)
    assert _key(folder, tmp_path) == base  # deterministic

    def nudge_layer(model):
        with torch.no_grad():
            model.bert.encoder.layer[1].output.dense.weight[0, 0] += 1e-3

    def nudge_head(model):
        with torch.no_grad():
            model.classifier.weight += 1.0

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["zzzunseenword"])  # the data encodes the same; the tokenizer is not the same
    assert tokenizer(["a good movie"]).input_ids == AutoTokenizer.from_pretrained(folder)(["a good movie"]).input_ids
    changed = {
        "weights": _key(folder, tmp_path, perturb=nudge_layer),
        "tokenizer": _key(folder, tmp_path, tokenizer=tokenizer),
        "data": _key(folder, tmp_path, texts=("a good movie", "boring plots")),
        "order": _key(folder, tmp_path, texts=("boring plot", "a good movie")),
        "max length": _key(folder, tmp_path, max_length=64),
        "cache dtype": _key(folder, tmp_path, dtype="bfloat16"),
    }
    assert all(key != base for key in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    # what READ trains does not change the backbone's states: the same entry serves
    assert _key(folder, tmp_path, perturb=nudge_head) == base
    assert _key(folder, tmp_path, config=ReadConfig(hidden_size=8, rnn_type="lstm", h0="embeddings")) == base

    script = (f"import sys; sys.path.insert(0, {str(REPO_ROOT / 'tests')!r}); from pathlib import Path; "
              f"from test_cache import _key; print(_key(Path({str(folder)!r}), Path({str(tmp_path)!r})))")
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other_process.stdout.strip().splitlines()[-1] == base


def test_second_run_and_other_read_settings_reuse_the_cache(tiny_models, tmp_path):
    config = _config(tmp_path, tiny_models["bert"], cache_features=True, epochs=1)
    first = train(config)["feature_cache"]
    assert not first["reused"]
    second = train(config)["feature_cache"]
    assert second["reused"] and second["entries"]["train"]["key"] == first["entries"]["train"]["key"]
    config.method_options = {"hidden_size": 8, "rnn_type": "rnn", "aggregation": "last"}
    assert train(config)["feature_cache"]["reused"]
    # h0 from the embeddings needs one more slot: rebuilt once, and the larger entry then serves everyone
    config.method_options = {"hidden_size": 8, "h0": "embeddings"}
    with_embeddings = train(config)["feature_cache"]
    assert not with_embeddings["reused"] and with_embeddings["bytes"] > first["bytes"]
    config.method_options = {"hidden_size": 16}
    assert train(config)["feature_cache"]["reused"]


def test_truncated_or_damaged_entry_is_rebuilt(tiny_models, tmp_path, step_losses):
    config = _config(tmp_path, tiny_models["llama"], cache_features=True, cache_dtype="float32")
    losses, metrics = _train_losses(config, step_losses)
    train_entry = Path(metrics["feature_cache"]["entries"]["train"]["path"])
    stream = train_entry / "stream-0.bin"
    size = stream.stat().st_size
    with open(stream, "r+b") as f:
        f.truncate(size - 64)
    again, metrics = _train_losses(config, step_losses)
    entries = metrics["feature_cache"]["entries"]
    assert not entries["train"]["reused"] and entries["dev validation"]["reused"]
    assert stream.stat().st_size == size and again == losses

    with open(stream, "r+b") as f:  # same size, changed bytes
        f.seek(size // 2)
        f.write(b"\xff" * 16)
    _, metrics = _train_losses(config, step_losses)
    assert not metrics["feature_cache"]["entries"]["train"]["reused"]


def test_a_killed_writer_leaves_nothing_that_looks_valid(tiny_models, tmp_path):
    """A build killed half-way (here: the process exits during the second batch) leaves only `<key>.partial`;
    it is never read, and the next build replaces it."""
    model, loaded = _read_model(tiny_models["bert"], ReadConfig(hidden_size=16))
    features = _features(loaded)
    ids = [f["input_ids"] for f in features]
    script = f"""
import os, sys
sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})
from pathlib import Path
from readapt.read.config import ReadConfig
from readapt.encoding import Collator
from readapt.read.cache import FeatureCache
from test_cache import _read_model, _features
model, loaded = _read_model(Path({str(tiny_models['bert'])!r}), ReadConfig(hidden_size=16))
features = _features(loaded)
cache = FeatureCache(model, loaded.tokenizer, max_length=24, text_to_text=False, directory={str(tmp_path)!r})
plan = cache.plan("train", [("encoder", [f["input_ids"] for f in features])])
batches = []
def run(batch):
    batches.append(1)
    if len(batches) == 2:
        os._exit(9)
    model(**batch)
cache.open_or_build(plan, run, features, Collator(0, False, False), 4, "cpu")
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    cache = FeatureCache(model, loaded.tokenizer, max_length=24, text_to_text=False, directory=tmp_path)
    plan = cache.plan("train", [("encoder", ids)])
    assert plan.path.with_name(plan.key + ".partial").is_dir() and not plan.path.exists()
    assert not plan.reusable
    collator = Collator(loaded.tokenizer.pad_token_id, False, False)
    entry = cache.open_or_build(plan, lambda batch: model(**batch), features, collator, 4, "cpu")
    assert not plan.reused and entry.bytes > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([plan.key, plan.key + ".lock"])


# ---------------------------------------------------------------------------------------------- refusals
def test_over_budget_is_refused_before_anything_is_written(tiny_models, tmp_path, monkeypatch):
    config = _config(tmp_path, tiny_models["bert"], cache_features=True, cache_max_gb=1e-6)
    with pytest.raises(ConfigError, match="--cache-max-gb") as error:
        train(config)
    assert "\n" not in str(error.value) and "GB" in str(error.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()

    import readapt.read.cache

    class Disk:
        free = 10**6

    monkeypatch.setattr(readapt.read.cache.store.shutil, "disk_usage", lambda path: Disk)
    config.cache_max_gb = None
    with pytest.raises(ConfigError, match="free"):
        train(config)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("method,options,message", [
    ("full", {}, "needs --method read: with full the backbone's hidden states change"),
    ("lora", {}, "needs --method read: with lora"),
    ("lst", {}, "LST does not replay them yet"),
    ("read", {"couple_encoder": True}, "needs decoupled READ"),
])
def test_methods_that_cannot_use_the_cache_are_refused(method, options, message, tmp_path):
    config = TrainingConfig(data=DataConfig(task="sst2"), method=method, method_options=options, cache_features=True,
                            output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_backbone_dtype_and_cache_flags_are_checked(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--backbone-dtype bfloat16 needs --method read"):
        TrainingConfig(data=DataConfig(task="sst2"), method="full", backbone_dtype="bfloat16").validate()
    with pytest.raises(ConfigError, match="--cache-max-gb"):
        TrainingConfig(data=DataConfig(task="sst2"), cache_features=True, cache_max_gb=0).validate()
    code = main(["train", "--task", "sst2", "--no-cache-features", "--cache-dir", str(tmp_path), "--output-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--cache-dir apply only with the feature cache" in err
    code = main(["train", "--task", "sst2", "--method", "full", "--cache-features", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--cache-features needs --method read" in err


# ---------------------------------------------------------------------------------------------- low-precision backbone
@pytest.mark.parametrize("kind", ["bert", "t5", "llama"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_backbone_keeps_side_network_and_head_float32(kind, dtype, tiny_models, tmp_path, step_losses):
    config = _config(tmp_path, tiny_models[kind], epochs=1)
    reference, _ = _train_losses(config, step_losses)
    config.backbone_dtype = dtype
    losses, metrics = _train_losses(config, step_losses)
    assert metrics["backbone_dtype"] == dtype
    # random tiny backbones: every state moves by up to the dtype's rounding, the losses by less than 1%
    assert losses == pytest.approx(reference, rel=1e-2)
    loaded = load_backbone(str(tiny_models[kind]), 2, dtype=dtype, decoder_head="classifier")
    model = get_read_model(loaded.model, ReadConfig(hidden_size=16))
    assert {p.dtype for p in model.read.parameters()} == {torch.float32}
    for name in model.head_module_names:
        assert {p.dtype for p in model.backbone.get_submodule(name).parameters()} == {torch.float32}
    assert model.info.stacks[0].layers[0].parameters().__next__().dtype == getattr(torch, dtype)


# ---------------------------------------------------------------------------------------------- command line, real data
@needs_real_glue
@pytest.mark.parametrize("kind,task", [("bert", "sst2"), ("t5", "rte")])
def test_cli_train_with_cache_features(kind, task, tiny_models, tmp_path, capsys):
    arguments = ["train", "--task", task, "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models[kind]),
                 "--max-train-samples", "24", "--max-eval-samples", "16", "--batch-size", "8", "--epochs", "2",
                 "--max-length", "48", "--no-progress", "--output-dir", str(tmp_path / "run"), "--cache-features",
                 "--cache-dir", str(tmp_path / "cache"), "--cache-dtype", "bfloat16", "--cache-max-gb", "1"]
    assert main(arguments) == 0, capsys.readouterr().err
    assert "feature cache:" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cache = metrics["feature_cache"]
    assert cache["dtype"] == "bfloat16" and not cache["reused"] and metrics["config"]["cache_features"]
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 2 and all((p / "manifest.json").is_file() for p in entries)
    assert main([*arguments, "--overwrite"]) == 0
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["feature_cache"]["reused"]
    assert [e["train_loss"] for e in again["epochs"]] == [e["train_loss"] for e in metrics["epochs"]]


@pytest.mark.slow
@needs_real_glue
def test_real_backbone_float16_cache_matches_live(tmp_path, step_losses):
    """all-MiniLM-L6-v2, 200 real SST-2 rows, 2 epochs: a float16 cache trains with the live run's losses."""
    config = TrainingConfig(data=DataConfig(task="sst2", data_dir=str(REAL_GLUE_DIR), max_train_samples=200,
                                            max_eval_samples=100),
                            epochs=2, batch_size=32, max_length=64, progress=False, output_dir=str(tmp_path / "run"),
                            overwrite=True, cache_dir=str(tmp_path / "cache"))
    live, live_metrics = _train_losses(config, step_losses)
    config.cache_features = True
    cached, metrics = _train_losses(config, step_losses)
    assert cached == pytest.approx(live, rel=2e-3)
    assert metrics["best_score"] == pytest.approx(live_metrics["best_score"], abs=0.02)


@pytest.mark.slow
@needs_real_glue
def test_real_backbone_bfloat16_quality_close_to_float32(tmp_path):
    """all-MiniLM-L6-v2, 400 real SST-2 training rows, 3 epochs, 400 dev rows: the bfloat16 backbone's dev accuracy
    is within 3 points of float32, and both learn (READ needs more than one epoch of 400 rows to leave the ~51%
    of a constant answer on this backbone). Both run from a float32 feature cache, which replays each backbone's
    own states (bfloat16 values are exact in float32), so the slow bfloat16 CPU kernels run once per example."""
    scores = {}
    for dtype in ("float32", "bfloat16"):
        config = TrainingConfig(data=DataConfig(task="sst2", data_dir=str(REAL_GLUE_DIR), max_train_samples=400,
                                                max_eval_samples=400),
                                epochs=3, batch_size=16, max_length=64, progress=False, backbone_dtype=dtype,
                                cache_features=True, cache_dtype="float32", cache_dir=str(tmp_path / "cache"),
                                output_dir=str(tmp_path / dtype))
        scores[dtype] = train(config)["best_score"]
    assert scores["float32"] > 0.6
    assert abs(scores["bfloat16"] - scores["float32"]) <= 0.03, scores


@pytest.mark.slow  # four fresh processes
@needs_real_glue
def test_cache_benchmark_runs_on_a_tiny_model(tiny_models, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cache_benchmark", REPO_ROOT / "benchmarks" / "cache.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.main(["--model", str(tiny_models["bert"]), "--data-dir", str(REAL_GLUE_DIR), "--train-samples", "24",
                             "--eval-samples", "8", "--epochs", "2", "--full-epochs", "1", "--bf16-epochs", "1",
                             "--batch-size", "8", "--max-length", "32", "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert set(result["runs"]) == {"read_cached", "read", "full", "read_bf16"}
    assert result["cache_bytes"] > 0 and result["cached_over_full"] > 0
    assert "goal <= 0.03" in capsys.readouterr().out and (tmp_path / "r.json").is_file()
