"""Many READ adapters on one frozen backbone: load / set / delete / list, the shared pass (each adapter's output
equals its output alone), task.json, and `readapt predict` (one backbone pass per batch, CSV / JSONL)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from conftest import REAL_GLUE_DIR, make_batch, needs_real_glue, tiny_backbone, train_steps
from readapt import ConfigError, IncompatibleAdapterError, ReadConfig, ReadModel, get_read_model
from readapt.answers import candidate_scores
from readapt.cli import main
from readapt.encoding import Candidates
from readapt.inference import Predictor
from readapt.methods import get_method
from readapt.recipe import DataConfig, TrainingConfig
from readapt.task_spec import TASK_FILE, TaskSpec, read_task_file, write_task_file
from readapt.tasks import get_task

# [CLS]-only passes need adapters without a token mixer (it makes [CLS]'s correction depend on every token);
# MIXED has the default one (auto: 2 layers on an encoder), so the shared pass is checked with it too.
SMALL = ReadConfig(hidden_size=16, token_mixer_layers=0)
MIXED = ReadConfig(hidden_size=16)
OTHER = ReadConfig(hidden_size=8, rnn_type="lstm", h0="embeddings", aggregation="last", token_mixer_layers=0)


# ------------------------------------------------------------------------------------------- helpers
def _tiny_bert_folder(folder: Path) -> Path:
    """A tiny random BERT saved once, so that every copy loaded from it has the same body, whatever its head."""
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def _bert(folder: Path, num_labels: int):
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels,
                                                              ignore_mismatched_sizes=True).eval()


def _train_and_save(backbone, config: ReadConfig, batch: dict, directory: Path, steps: int = 4) -> None:
    model = get_read_model(backbone, config)
    train_steps(model, batch, steps=steps)
    model.save_pretrained(directory)


def _labelled(batch: dict, num_labels: int) -> dict:
    rows = batch["input_ids"].shape[0]
    return {**batch, "labels": torch.arange(rows) % num_labels}


def _alone(backbone, directory: Path, batch: dict, inputs: list | None = None) -> torch.Tensor:
    """An adapter's logits with the adapter loaded by itself (the reference the shared pass must equal);
    `inputs` receives what its side network was given."""
    model = ReadModel.from_pretrained(backbone, directory)
    if inputs is not None:
        _record_side_inputs(model, inputs)
    with torch.no_grad():
        return model(**batch).logits


def _record_side_inputs(model: ReadModel, into: list) -> None:
    """Keep a copy of every (layer states, embeddings) the active side network gets, before it normalises them."""
    def hook(module, args):
        into.append([None if t is None else t.clone() for t in args[:2]])

    model.read["encoder"].register_forward_pre_hook(hook)


class LayerCounter:
    """Counts runs of a stack's first layer: each is one pass through the frozen body."""

    def __init__(self, model: ReadModel):
        self.calls = 0
        self.handles = [stack.layers[0].register_forward_hook(self._count) for stack in model.adapted_stacks]

    def _count(self, *_):
        self.calls += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory) -> tuple[Path, dict[str, Path], dict]:
    """A tiny BERT and three adapters trained a few steps on it: 2 labels (GRU), 3 labels (LSTM, h0 from the
    embeddings, last-layer aggregation) and 2 labels again (GRU and the default token mixer, another seed)."""
    root = tmp_path_factory.mktemp("multi")
    folder = _tiny_bert_folder(root / "bert")
    batch = {k: v for k, v in make_batch("bert", batch=4, length=9).items() if k != "labels"}
    adapters = {"two": root / "two", "three": root / "three", "two-b": root / "two-b"}
    _train_and_save(_bert(folder, 2), SMALL, _labelled(batch, 2), adapters["two"])
    _train_and_save(_bert(folder, 3), OTHER, _labelled(batch, 3), adapters["three"])
    torch.manual_seed(7)
    _train_and_save(_bert(folder, 2), MIXED, _labelled(batch, 2), adapters["two-b"], steps=6)
    return folder, adapters, batch


# ------------------------------------------------------------------------------------------- shared pass
def test_shared_pass_equals_each_adapter_alone(bert_adapters):
    """Bit-exact (torch.equal): the shared pass hands every adapter a copy of the very float32 layer-state buffer
    that its own live pass would fill, and the side network and head then run the same operations on the same
    shapes. (Compared under no_grad on both sides: PyTorch's LSTM kernel differs in the last bit between grad
    and no-grad mode, independently of readapt.)"""
    folder, adapters, batch = bert_adapters
    alone_inputs = {name: [] for name in adapters}
    references = {name: _alone(_bert(folder, 3 if name == "three" else 2), path, batch, alone_inputs[name])
                  for name, path in adapters.items()}
    assert references["two"].shape[-1] == 2 and references["three"].shape[-1] == 3
    assert alone_inputs["three"][0][1] is not None  # h0 from the embeddings: they are shared too

    model = ReadModel.from_pretrained(_bert(folder, 2), adapters["two"], adapter_name="two")
    model.load_adapter(adapters["three"], "three")
    model.load_adapter(adapters["two-b"], "two-b")
    shared_inputs = {name: [] for name in adapters}
    for name in adapters:
        with model.using_adapter(name):
            _record_side_inputs(model, shared_inputs[name])
    counter = LayerCounter(model)
    for order in (["two", "three", "two-b"], ["three", "two-b", "two"], ["two-b", "three"]):
        counter.calls = 0
        outputs = model.forward_adapters(**batch, adapter_names=order)
        assert counter.calls == 1, "the frozen body ran more than once"
        assert list(outputs) == order
        for name in order:
            assert torch.equal(outputs[name].logits, references[name]), name
            # each side network got exactly what it gets alone (none got states another one had normalised);
            # the embeddings only where it uses them (they are captured for all once one adapter needs them)
            (states, embeddings), (expected_states, expected_embeddings) = shared_inputs[name].pop(), alone_inputs[name][0]
            assert torch.equal(states, expected_states), name
            assert expected_embeddings is None or torch.equal(embeddings, expected_embeddings), name
        assert model.active_adapter == "two"  # run_adapters puts the active adapter back
    counter.close()
    # Different adapters really give different outputs (the comparison above is not vacuous).
    assert not torch.allclose(references["two"], references["two-b"])


@pytest.mark.parametrize("kind", ["llama-cls", "t5"])
def test_shared_pass_on_decoder_only_and_text_to_text(kind, tmp_path):
    batch = make_batch(kind)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for seed, config in ((1, SMALL), (2, OTHER)):
        torch.manual_seed(seed)
        _train_and_save(tiny_backbone(kind), config, batch, tmp_path / f"a{seed}")
    model = ReadModel.from_pretrained(tiny_backbone(kind), tmp_path / "a1", adapter_name="a1")
    model.load_adapter(tmp_path / "a2", "a2")
    if kind == "t5":  # rank classification as `readapt eval`: the encoder once, the model once per candidate
        candidates = Candidates((0, 1, 2), ((5, 6, 1), (7, 1), (9, 10, 11, 1)))

        def run(target):
            return candidate_scores(target, inputs, candidates)
    else:
        def run(target):
            return target(**inputs).logits
    with torch.no_grad():
        references = {name: run(ReadModel.from_pretrained(tiny_backbone(kind), tmp_path / name)) for name in ("a1", "a2")}
    counter = LayerCounter(model)
    outputs = model.run_adapters(lambda: run(model))
    stack_calls = 1 + 3 if kind == "t5" else 1  # T5: the encoder, then the decoder per candidate
    assert counter.calls == stack_calls
    counter.close()
    for name in ("a1", "a2"):
        assert torch.equal(outputs[name], references[name]), name
    assert not torch.equal(references["a1"], references["a2"])


def test_cls_only_correction_equals_full_correction(bert_adapters, tmp_path):
    """The side networks on [CLS] alone give the head what the full correction gives it (a BERT head reads
    [CLS] only); to float rounding, since the RNN's matrix products run on fewer rows (1e-6 absolute)."""
    folder, adapters, batch = bert_adapters
    model = ReadModel.from_pretrained(_bert(folder, 3), adapters["three"])
    with torch.no_grad():
        full = model(**batch).logits
        assert model.head_reads_only(slice(0, 1), **batch)
        with model.correcting_positions(slice(0, 1)):
            cls = model(**batch).logits
    torch.testing.assert_close(cls, full, rtol=0, atol=1e-6)
    # A decoder-only head reads the last real token, not the first: the check says so.
    llama = get_read_model(tiny_backbone("llama-cls"), SMALL)
    train_steps(llama, make_batch("llama-cls"), steps=3)
    inputs = {k: v for k, v in make_batch("llama-cls").items() if k != "labels"}
    assert not llama.head_reads_only(slice(0, 1), **inputs)
    t5 = get_read_model(tiny_backbone("t5"), SMALL)
    with pytest.raises(ConfigError, match="single-stack"), t5.correcting_positions(slice(0, 1)):
        pass


def test_pooled_context_adapters_share_a_cls_only_pass(bert_adapters, tmp_path):
    """Adapters with the "pooled" sequence context next to per-token ones: one backbone pass, side networks on
    [CLS] and the pooled sequence (taken over every real token before the states are cut), the logits of each
    adapter alone with its full correction (1e-5: fewer rows in the matrix products)."""
    folder, adapters, batch = bert_adapters
    pooled = {"p1": tmp_path / "p1", "p2": tmp_path / "p2"}
    for seed, directory in enumerate(pooled.values()):
        torch.manual_seed(seed)
        _train_and_save(_bert(folder, 2), ReadConfig(hidden_size=16, sequence_context="pooled", token_mixer_layers=0),
                        _labelled(batch, 2), directory)
    model = ReadModel.from_pretrained(_bert(folder, 2), pooled["p1"], adapter_name="p1")
    model.load_adapter(pooled["p2"], "p2")
    model.load_adapter(adapters["two"], "two")
    alone = {name: _alone(_bert(folder, 2), directory, batch) for name, directory in {**pooled, "two": adapters["two"]}.items()}
    counter = LayerCounter(model)
    with model.correcting_positions(slice(0, 1)):
        shared = model.forward_adapters(**batch)
    counter.close()
    assert counter.calls == 1
    for name, logits in shared.items():
        torch.testing.assert_close(logits.logits, alone[name], rtol=0, atol=1e-5)


def test_segments_context_adapters_share_a_cls_only_pass(bert_adapters, tmp_path):
    """A "segments" adapter (the texts' means, taken over every real token before the states are cut) next to a
    "pooled" and a per-token one: one backbone pass, [CLS]-only side networks, each adapter's logits alone."""
    folder, adapters, batch = bert_adapters
    separator = int(batch["input_ids"][0, 3])  # row 0 (at least) is a pair
    directories = {"seg": tmp_path / "seg", "pool": tmp_path / "pool"}
    for seed, (name, context) in enumerate((("seg", "segments"), ("pool", "pooled"))):
        torch.manual_seed(seed)
        _train_and_save(_bert(folder, 2), ReadConfig(hidden_size=16, sequence_context=context, token_mixer_layers=0,
                                                     separator_token_id=separator), _labelled(batch, 2), directories[name])
    model = ReadModel.from_pretrained(_bert(folder, 2), directories["seg"], adapter_name="seg")
    model.load_adapter(directories["pool"], "pool")
    model.load_adapter(adapters["two"], "two")
    alone = {name: _alone(_bert(folder, 2), directory, batch)
             for name, directory in {**directories, "two": adapters["two"]}.items()}
    counter = LayerCounter(model)
    with torch.no_grad(), model.correcting_positions(slice(0, 1)):
        shared = model.forward_adapters(**batch)
    counter.close()
    assert counter.calls == 1
    for name, logits in shared.items():
        torch.testing.assert_close(logits.logits, alone[name], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- managing adapters
def test_set_list_delete_and_save(bert_adapters, tmp_path):
    folder, adapters, batch = bert_adapters
    model = ReadModel.from_pretrained(_bert(folder, 2), adapters["two"])
    assert model.adapters == model.list_adapters() == ["default"] and model.active_adapter == "default"
    trainable_alone = sum(p.numel() for p in model.parameters())
    model.load_adapter(adapters["three"], "three")
    assert model.adapters == ["default", "three"] and model.active_adapter == "default"
    assert sum(p.numel() for p in model.parameters()) == trainable_alone  # only the active adapter is in the tree
    assert model.adapter_configs["three"].rnn_type == "lstm"

    with torch.no_grad():
        assert model(**batch).logits.shape[-1] == 2
        model.set_adapter("three")
        assert model.active_adapter == "three" and model.read_config.rnn_type == "lstm"
        logits = model(**batch).logits
        assert torch.equal(logits, _alone(_bert(folder, 3), adapters["three"], batch))
        # the loss follows the active head: 3 classes now
        assert model.backbone.num_labels == 3
        assert torch.isfinite(model(**batch, labels=torch.tensor([0, 1, 2, 1])).loss)
        with model.using_adapter("default"):
            assert model(**batch).logits.shape[-1] == 2 and model.backbone.num_labels == 2
        assert model.active_adapter == "three"

    # save_pretrained writes every adapter in PEFT's layout ("default" at the root, the others in sub-folders);
    # loaded alone, each gives the same outputs
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(_alone(_bert(folder, 3), tmp_path / "saved" / "three", batch), logits)

    with pytest.raises(ConfigError, match="no adapter named 'nope'; loaded: default, three"):
        model.set_adapter("nope")
    with pytest.raises(ConfigError, match="already loaded"):
        model.load_adapter(adapters["two"], "three")
    model.delete_adapter("three")  # the active one: the first other adapter takes over
    assert model.adapters == ["default"] and model.active_adapter == "default"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _alone(_bert(folder, 2), adapters["two"], batch))
    with pytest.raises(ConfigError, match="only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ConfigError, match="no adapter named"):
        model.delete_adapter("three")
    assert model.unload() is model.backbone  # hooks removed, as with a single adapter


def test_foreign_and_mismatched_adapters_are_refused(bert_adapters, tmp_path):
    folder, adapters, batch = bert_adapters
    model = ReadModel.from_pretrained(_bert(folder, 2), adapters["two"])
    wide = get_read_model(tiny_backbone("bert", width=48), SMALL)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(IncompatibleAdapterError, match="was trained on BertForSequenceClassification .*width 48.* but the "
                                                       "backbone is .*width 32"):
        model.load_adapter(tmp_path / "wide", "wide")
    llama = get_read_model(tiny_backbone("llama-cls"), SMALL)
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(IncompatibleAdapterError, match="LlamaForSequenceClassification"):
        model.load_adapter(tmp_path / "llama", "llama")
    get_method("lora").save(get_method("lora").prepare(_bert(folder, 2), {}), tmp_path / "lora")
    with pytest.raises(IncompatibleAdapterError, match="made by method 'lora', not 'read'"):
        model.load_adapter(tmp_path / "lora", "lora")
    assert model.adapters == ["default"]  # nothing half-loaded

    t5 = get_read_model(tiny_backbone("t5"), SMALL)
    get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=16, stacks=["decoder"])).save_pretrained(tmp_path / "dec")
    with pytest.raises(IncompatibleAdapterError, match="adapts the decoder stack"):
        t5.load_adapter(tmp_path / "dec", "dec")


# ------------------------------------------------------------------------------------------- task.json
@pytest.mark.parametrize("task_name", ["mnli", "stsb", "sst2"])
@pytest.mark.parametrize("text_to_text", [False, True])
def test_task_file_round_trip(task_name, text_to_text, tmp_path):
    task = get_task(task_name)
    write_task_file(tmp_path, task, TrainingConfig(data=DataConfig(task=task_name), max_length=77), text_to_text)
    spec = read_task_file(tmp_path)
    assert spec.task == task and spec.max_length == 77 and spec.text_to_text is text_to_text
    assert spec.source == "glue" and spec.glue_task == task.name
    record = json.loads((tmp_path / TASK_FILE).read_text())
    assert ("candidates" in record) is text_to_text
    (tmp_path / TASK_FILE).write_text("{not json")
    with pytest.raises(IncompatibleAdapterError, match="not a valid readapt task file"):
        read_task_file(tmp_path)


# ------------------------------------------------------------------------------------------- readapt predict
ROWS = [
    {"sentence": "a gripping, funny film", "sentence1": "A man plays.", "sentence2": "Someone plays."},
    {"sentence": "dull and far too long", "sentence1": "It rains.", "sentence2": "The sun shines."},
    {"sentence": "great cast", "sentence1": "Cats sleep.", "sentence2": "Cats are sleeping."},
    {"sentence": "I walked out", "sentence1": "A", "sentence2": "B"},
    {"sentence": "worth seeing twice, \"really\"", "sentence1": "x, y", "sentence2": "z"},
]


@pytest.fixture(scope="module")
def predict_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """On the tiny BERT with the real tokenizer: an SST-2 adapter and an STS-B adapter (Python API, task files
    written as `readapt train` writes them), and a 3-class custom-task adapter trained by `readapt train`."""
    from readapt.pretrained import load_backbone

    root = tmp_path_factory.mktemp("predict")
    made = {}
    for name, steps in (("sst2", 4), ("stsb", 4)):
        task = get_task(name)
        loaded = load_backbone(str(tiny_models["bert"]), task.num_labels, task.is_regression)
        columns = [[row[c] for row in ROWS] for c in task.text_fields]
        encoded = loaded.tokenizer(*columns, padding=True, truncation=True, max_length=32, return_tensors="pt")
        labels = torch.rand(len(ROWS)) * 5 if task.is_regression else torch.arange(len(ROWS)) % 2
        model = get_read_model(loaded.model, SMALL)
        train_steps(model, {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "labels": labels},
                    steps=steps)
        made[name] = root / name / "adapter"
        model.save_pretrained(made[name])
        write_task_file(made[name], task, TrainingConfig(data=DataConfig(task=name), max_length=32), False)

    topics = ["sport", "film", "food"]
    lines = [json.dumps({"sentence": f"text {i} about {topics[i % 3]}", "topic": topics[i % 3]}) for i in range(18)]
    for split in ("train", "dev"):
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    code = main(["train", "--train-file", str(root / "train.jsonl"), "--validation-file", str(root / "dev.jsonl"),
                 "--text-columns", "sentence", "--label-column", "topic", "--model", str(tiny_models["bert"]),
                 "--output-dir", str(root / "topic"), "--epochs", "1", "--batch-size", "6", "--max-length", "32",
                 "--read-hidden-size", "16", "--read-token-mixer-layers", "0", "--no-progress"])
    assert code == 0
    made["topic"] = root / "topic" / "adapter"
    return made


def test_training_writes_the_task_file(predict_adapters):
    spec = read_task_file(predict_adapters["topic"])
    assert spec.source == "custom" and spec.task.text_fields == ("sentence",)
    assert spec.task.label_names == ("film", "food", "sport") and not spec.task.is_regression
    assert spec.max_length == 32 and spec.text_to_text is False
    record = json.loads((predict_adapters["topic"] / TASK_FILE).read_text())
    assert record["custom"] == {"text_columns": ["sentence"], "label_column": "topic", "task_type": "auto"}


def _count_body_passes(monkeypatch) -> list[int]:
    """Body passes per predicted batch, seen by a hook on the first encoder layer."""
    passes: list[int] = []
    original = Predictor.predict_batch

    def counting(self, rows, shared=True):
        counter = LayerCounter(self.model)
        try:
            return original(self, rows, shared)
        finally:
            counter.close()
            passes.append(counter.calls)

    monkeypatch.setattr(Predictor, "predict_batch", counting)
    return passes


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: row[c] for c in columns} for row in rows)


def test_predict_csv_one_backbone_pass_per_batch(predict_adapters, tiny_models, tmp_path, monkeypatch, capsys):
    passes = _count_body_passes(monkeypatch)
    _write_csv(tmp_path / "in.csv", ROWS, ["sentence"])
    out = tmp_path / "out.csv"
    code = main(["predict", "--model", str(tiny_models["bert"]), "--adapter", str(predict_adapters["sst2"]),
                 "--adapter", str(predict_adapters["topic"]), "--input", str(tmp_path / "in.csv"), "--output", str(out),
                 "--batch-size", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert passes == [1, 1, 1], "one backbone pass per batch serves both adapters"
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["sentence", "sst2", "topic"]  # named after the run folders of <run>/adapter
    assert [row["sentence"] for row in table] == [row["sentence"] for row in ROWS]
    assert {row["sst2"] for row in table} <= {"negative", "positive"}
    assert {row["topic"] for row in table} <= {"film", "food", "sport"}
    assert "2 adapter(s)" in capsys.readouterr().err

    # Each adapter alone (its own backbone pass) predicts the same.
    for name in ("sst2", "topic"):
        alone = tmp_path / f"{name}.csv"
        assert main(["predict", "--model", str(tiny_models["bert"]), "--adapter", str(predict_adapters[name]),
                     "--input", str(tmp_path / "in.csv"), "--output", str(alone), "--batch-size", "2",
                     "--no-progress"]) == 0
        with open(alone, newline="") as f:
            assert [row[name] for row in csv.DictReader(f)] == [row[name] for row in table]


def test_predict_jsonl_to_stdout_and_jsonl_file(predict_adapters, tiny_models, tmp_path, monkeypatch, capsys):
    passes = _count_body_passes(monkeypatch)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({**row, "id": i}) + "\n" for i, row in enumerate(ROWS)))
    arguments = ["predict", "--model", str(tiny_models["bert"]), "--adapter", str(predict_adapters["sst2"]),
                 "--adapter", str(predict_adapters["stsb"]), "--adapter", str(predict_adapters["topic"]),
                 "--name", "sentiment", "--name", "similarity", "--name", "topic",
                 "--input", str(tmp_path / "in.jsonl"), "--batch-size", "4", "--no-progress"]
    assert main(arguments) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # two inputs (sentence / sentence1+sentence2): two body passes per batch, for three adapters
    assert passes == [2, 2]
    assert [r["id"] for r in records] == list(range(len(ROWS)))  # input fields kept, types too
    assert all(isinstance(r["similarity"], float) for r in records)
    assert all(r["sentiment"] in ("negative", "positive") and r["topic"] in ("film", "food", "sport") for r in records)

    assert main([*arguments, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert capsys.readouterr().out == ""
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == records


def test_predictor_shared_equals_sequential(predict_adapters, tiny_models):
    predictor = Predictor([predict_adapters[n] for n in ("sst2", "topic", "stsb")], model=str(tiny_models["bert"]))
    assert predictor.positions == slice(0, 1)  # BERT heads read [CLS]: the side networks run there only
    assert [group.names for group in predictor.groups] == [["sst2", "topic"], ["stsb"]]
    shared = predictor.predict(ROWS, batch_size=2)
    assert shared == predictor.predict(ROWS, batch_size=2, shared=False)
    full = Predictor([predict_adapters[n] for n in ("sst2", "topic", "stsb")], model=str(tiny_models["bert"]),
                     head_only=False)
    assert full.positions is None
    assert {k: v for k, v in full.predict(ROWS, batch_size=2).items() if k != "stsb"} == \
           {k: v for k, v in shared.items() if k != "stsb"}
    assert full.predict(ROWS, batch_size=2)["stsb"] == pytest.approx(shared["stsb"], abs=1e-6)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("readapt: error: "), err
    return err


def test_predict_bad_input(predict_adapters, tiny_models, tmp_path, capsys):
    base = ["predict", "--model", str(tiny_models["bert"]), "--no-progress"]
    _write_csv(tmp_path / "in.csv", ROWS, ["sentence", "sentence1"])
    code = main([*base, "--adapter", str(predict_adapters["sst2"]), "--adapter", str(predict_adapters["stsb"]),
                 "--input", str(tmp_path / "in.csv")])
    assert code == 2
    err = _one_line_error(capsys)
    assert "no column 'sentence2', needed by adapter 'stsb'" in err and "'sentence', 'sentence1'" in err

    (tmp_path / "in.jsonl").write_text(json.dumps({"sentence": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert main([*base, "--adapter", str(predict_adapters["sst2"]), "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "in.jsonl, line 2: no column 'sentence', needed by adapter 'sst2'" in _one_line_error(capsys)

    cases = {
        "same default name": ([str(predict_adapters["sst2"])] * 2, [], "would both be named 'sst2'"),
        "names and adapters differ": ([str(predict_adapters["sst2"])], ["a", "b"], "--name was given 2 time(s)"),
        "name clashes with an input column": ([str(predict_adapters["sst2"])], ["sentence"], "would overwrite input"),
    }
    for adapters, names, message in cases.values():
        arguments = [*base, *(x for a in adapters for x in ("--adapter", a)), *(x for n in names for x in ("--name", n)),
                     "--input", str(tmp_path / "in.csv")]
        assert main(arguments) == 2
        assert message in _one_line_error(capsys)

    assert main([*base, "--adapter", str(predict_adapters["sst2"]), "--input", str(tmp_path / "in.csv"),
                 "--output", str(tmp_path / "out.parquet")]) == 2
    assert "unsupported type '.parquet'" in _one_line_error(capsys)
    assert not (tmp_path / "out.parquet").exists()


def test_predict_refuses_other_methods_foreign_backbones_and_adapters_without_task(predict_adapters, tiny_models,
                                                                                   tmp_path, capsys):
    from readapt.pretrained import load_backbone

    _write_csv(tmp_path / "in.csv", ROWS, ["sentence"])
    base = ["predict", "--model", str(tiny_models["bert"]), "--input", str(tmp_path / "in.csv"), "--no-progress"]
    lora = tmp_path / "lora"
    get_method("lora").save(get_method("lora").prepare(load_backbone(str(tiny_models["bert"]), 2).model, {}), lora)
    capsys.readouterr()  # what making the LoRA adapter printed (a transformers deprecation warning under peft)
    assert main([*base, "--adapter", str(predict_adapters["sst2"]), "--adapter", str(lora)]) == 2
    assert "made by method 'lora': readapt predict serves READ adapters only" in _one_line_error(capsys)

    llama = tmp_path / "llama"
    get_read_model(load_backbone(str(tiny_models["llama"]), 2, decoder_head="classifier").model,
                   SMALL).save_pretrained(llama)
    write_task_file(llama, get_task("sst2"), TrainingConfig(data=DataConfig(task="sst2")), False)
    assert main([*base, "--adapter", str(predict_adapters["sst2"]), "--adapter", str(llama)]) == 2
    err = _one_line_error(capsys)
    assert "trained on LlamaForSequenceClassification" in err and "BertForSequenceClassification" in err

    bare = tmp_path / "bare"
    get_read_model(load_backbone(str(tiny_models["bert"]), 2).model, SMALL).save_pretrained(bare)
    assert main([*base, "--adapter", str(bare)]) == 2
    assert "task.json is missing" in _one_line_error(capsys)


def test_render_csv_quotes_and_non_string_inputs():
    from readapt.inference import render

    text = render(["a", "n"], [{"a": 'x, "y"', "n": 3}], {"p": ["pos"], "r": [0.5]}, ".csv")
    assert list(csv.reader(io.StringIO(text))) == [["a", "n", "p", "r"], ['x, "y"', "3", "pos", "0.5"]]


def test_task_spec_input_keys_group_adapters():
    sst2 = TaskSpec(get_task("sst2"), 128, False)
    assert sst2.input_key() == TaskSpec(get_task("cola"), 128, False).input_key()  # both read `sentence`
    assert sst2.input_key() != TaskSpec(get_task("sst2"), 64, False).input_key()
    assert TaskSpec(get_task("rte"), 128, False).input_key() == TaskSpec(get_task("stsb"), 128, False).input_key()
    # text-to-text prompts name the task: no sharing across tasks
    assert TaskSpec(get_task("sst2"), 128, True).input_key() != TaskSpec(get_task("cola"), 128, True).input_key()


# ------------------------------------------------------------------------------------------- the real backbone
@pytest.mark.slow
@needs_real_glue
def test_real_backbone_two_tasks_one_pass(tmp_path, capsys):
    """all-MiniLM-L6-v2, READ adapters for SST-2 and CoLA trained by `readapt train` on a few real rows, then
    `readapt predict` on real SST-2 dev sentences: one body pass per batch, predictions equal to each alone."""
    few = ["--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16", "--epochs", "1",
           "--max-length", "64", "--no-progress", "--data-dir", str(REAL_GLUE_DIR)]
    for task in ("sst2", "cola"):
        assert main(["train", "--task", task, "--output-dir", str(tmp_path / task), *few]) == 0
    from readapt.tasks import load_glue_split

    rows = [{"sentence": e.texts[0]} for e in load_glue_split("sst2", REAL_GLUE_DIR, "validation", max_samples=24)]
    predictor = Predictor([tmp_path / "sst2" / "adapter", tmp_path / "cola" / "adapter"])
    assert predictor.positions is None  # the default token mixer: every token is corrected
    counter = LayerCounter(predictor.model)
    shared = predictor.predict(rows, batch_size=8)
    assert counter.calls == 3
    counter.close()
    assert shared == predictor.predict(rows, batch_size=8, shared=False)
    assert set(shared["sst2"]) <= {"negative", "positive"} and set(shared["cola"]) <= {"unacceptable", "acceptable"}


@pytest.mark.slow
@needs_real_glue
def test_predict_benchmark_runs(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_predict", Path(__file__).resolve().parents[1] / "benchmarks" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--data-dir", str(REAL_GLUE_DIR), "--samples", "8", "--batch-size", "4", "--adapters", "1,2",
                           "--heads", "cls"])
    assert len(results["runs"]) == 3 and all(r["cpu_per_1000"] > 0 for r in results["runs"])
    assert "shared and sequential predictions identical: True" in capsys.readouterr().out
