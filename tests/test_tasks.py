"""Task definitions, GLUE TSV readers (real files and synthetic bad input) and custom tasks."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.errors import DataError
from readapt.tasks import (
    GLUE_TASKS,
    STSB_FALLBACK_SCORE,
    Example,
    get_task,
    load_custom_task,
    load_glue,
    load_glue_split,
    stsb_to_text,
    text_to_stsb,
)


def real_glue_file(glue_dir: str, stem: str) -> Path | None:
    for name in (f"{stem}.tsv", f"{stem}.tsv.gz"):
        if (REAL_GLUE_DIR / glue_dir / name).is_file():
            return REAL_GLUE_DIR / glue_dir / name
    return None


def write_file(path: Path, content: str | bytes, gz: bool = False) -> Path:
    """Write `content` to `path` (or `path` + ".gz", gzip-compressed). Returns the written path."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def tsv(*rows: tuple[str, ...]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


RTE_HEADER = ("index", "sentence1", "sentence2", "label")
STSB_HEADER = (
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
)


def stsb_row(index: int, sentence1: str, sentence2: str, score: str) -> tuple[str, ...]:
    return (
        str(index),
        "main-captions",
        "MSRvid",
        "2012test",
        "0001",
        "none",
        "none",
        sentence1,
        sentence2,
        score,
    )


# --- task definitions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("sst2", "sst2"),
        ("STS-B", "stsb"),
        ("sts_b", "stsb"),
        ("stsb", "stsb"),
        ("MNLI", "mnli"),
        ("CoLA", "cola"),
        ("QQP", "qqp"),
        ("wnli", "wnli"),
    ],
)
def test_get_task_accepts_usual_spellings(spelling, name):
    assert get_task(spelling).name == name


def test_get_task_rejects_unknown_name_listing_the_tasks():
    with pytest.raises(DataError, match=r"unknown GLUE task 'squad'; expected one of cola, sst2, .*wnli"):
        get_task("squad")


def test_all_nine_glue_tasks_with_their_folders():
    assert {name: task.glue_dir for name, task in GLUE_TASKS.items()} == {
        "cola": "CoLA",
        "sst2": "SST-2",
        "mrpc": "MRPC",
        "qqp": "QQP",
        "stsb": "STS-B",
        "mnli": "MNLI",
        "qnli": "QNLI",
        "rte": "RTE",
        "wnli": "WNLI",
    }


# Label names in the index order of the Hugging Face nyu-mll/glue ClassLabels; T5 used the same words as
# its verbalizers, so they are also the expected label words.
HUB_LABELS = [
    ("cola", ("unacceptable", "acceptable")),
    ("sst2", ("negative", "positive")),
    ("mrpc", ("not_equivalent", "equivalent")),
    ("qqp", ("not_duplicate", "duplicate")),
    ("mnli", ("entailment", "neutral", "contradiction")),
    ("qnli", ("entailment", "not_entailment")),
    ("rte", ("entailment", "not_entailment")),
    ("wnli", ("not_entailment", "entailment")),
]


@pytest.mark.parametrize(("name", "label_names"), HUB_LABELS)
def test_label_names_follow_hub_index_order(name, label_names):
    task = get_task(name)
    assert task.label_names == label_names
    assert task.num_labels == len(label_names)
    assert not task.is_regression


def test_stsb_is_regression_with_one_output():
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.label_names == () and stsb.num_labels == 1


@pytest.mark.parametrize(
    ("name", "metric_names", "main_metric"),
    [
        ("cola", ("matthews_correlation",), "matthews_correlation"),
        ("sst2", ("accuracy",), "accuracy"),
        ("mrpc", ("accuracy", "f1"), "combined"),
        ("qqp", ("accuracy", "f1"), "combined"),
        ("stsb", ("pearson", "spearmanr"), "combined"),
        ("mnli", ("accuracy",), "accuracy"),
        ("qnli", ("accuracy",), "accuracy"),
        ("rte", ("accuracy",), "accuracy"),
        ("wnli", ("accuracy",), "accuracy"),
    ],
)
def test_metrics_and_main_metric(name, metric_names, main_metric):
    task = get_task(name)
    assert task.metric_names == metric_names
    assert task.main_metric == main_metric


def test_dev_splits():
    assert get_task("mnli").dev_splits == ("validation_matched", "validation_mismatched")
    assert all(task.dev_splits == ("validation",) for name, task in GLUE_TASKS.items() if name != "mnli")


@pytest.mark.parametrize(
    ("name", "texts", "expected"),
    [
        ("cola", ("John ran.",), "cola sentence: John ran."),
        ("sst2", ("a gem . ",), "sst2 sentence: a gem . "),
        ("mrpc", ("A b .", "C d ."), "mrpc sentence1: A b . sentence2: C d ."),
        ("qqp", ("Why?", "How?"), "qqp question1: Why? question2: How?"),
        ("stsb", ("A man.", "A dog."), "stsb sentence1: A man. sentence2: A dog."),
        # texts are (premise, hypothesis); T5 writes the hypothesis first
        (
            "mnli",
            ("The premise.", "The hypothesis."),
            "mnli hypothesis: The hypothesis. premise: The premise.",
        ),
        ("qnli", ("Who?", "Him."), "qnli question: Who? sentence: Him."),
        ("rte", ("Text.", "Claim."), "rte sentence1: Text. sentence2: Claim."),
        ("wnli", ("It fell.", "The cup fell."), "wnli sentence1: It fell. sentence2: The cup fell."),
    ],
)
def test_format_text_to_text(name, texts, expected):
    assert get_task(name).format_text_to_text(Example(texts=texts, label=0, idx=0)) == expected


def test_format_text_to_text_rejects_wrong_number_of_texts():
    with pytest.raises(ValueError, match="2 text fields but the example has 1"):
        get_task("rte").format_text_to_text(Example(texts=("only one",), label=0, idx=0))


@pytest.mark.parametrize(("name", "label_words"), HUB_LABELS)
def test_label_words_round_trip(name, label_words):
    task = get_task(name)
    assert task.label_words == label_words
    for index, word in enumerate(label_words):
        assert task.label_to_text(index) == word
        assert task.text_to_label(f" {word}\n") == index
    assert task.text_to_label("maybe") == -1


def test_cola_label_one_is_acceptable_and_wnli_label_one_is_entailment():
    # In the TSV files CoLA 1 = acceptable and WNLI 1 = entailment.
    assert get_task("cola").label_to_text(1) == "acceptable"
    assert get_task("wnli").label_to_text(1) == "entailment"
    assert get_task("rte").label_to_text(1) == "not_entailment"


@pytest.mark.parametrize(
    ("score", "text"),
    [
        (3.83, "3.8"),  # 19.15 -> 19
        (3.9, "4.0"),  # 19.5 is a tie -> 20 (even)
        (0.1, "0.0"),  # 0.5 is a tie -> 0 (even): round(score * 5) / 5 rounds ties to even
        (0.3, "0.4"),  # 1.5 -> 2 (even)
        (2.5, "2.4"),  # 12.5 -> 12 (even)
        (4.75, "4.8"),  # 23.75 -> 24
        (0.0, "0.0"),
        (5.0, "5.0"),
        (1.0, "1.0"),
        (5.4, "5.0"),  # clamped to the scale
        (-0.3, "0.0"),  # clamped, and never "-0.0"
    ],
)
def test_stsb_to_text_rounds_to_nearest_fifth(score, text):
    assert stsb_to_text(score) == text


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("3.8", 3.8),
        (" 4.0\n", 4.0),
        ("5", 5.0),
        ("7.5", 5.0),
        ("-1", 0.0),
        ("banana", STSB_FALLBACK_SCORE),
        ("", STSB_FALLBACK_SCORE),
        ("nan", STSB_FALLBACK_SCORE),
        ("inf", STSB_FALLBACK_SCORE),
    ],
)
def test_text_to_stsb(text, score):
    assert text_to_stsb(text) == pytest.approx(score)


def test_stsb_fallback_is_the_midpoint_and_can_be_overridden():
    assert STSB_FALLBACK_SCORE == 2.5
    assert text_to_stsb("??", default=1.0) == 1.0


def test_stsb_round_trip_on_every_step():
    stsb = get_task("stsb")
    for step in range(26):
        score = step / 5
        assert text_to_stsb(stsb_to_text(score)) == pytest.approx(score)
        assert stsb.text_to_label(stsb.label_to_text(score)) == pytest.approx(score)


# --- real GLUE files ---------------------------------------------------------------------------

# (task, split, glue_dir, file stem, official row count)
REAL_FILES = [
    ("cola", "train", "CoLA", "train", 8551),
    ("cola", "validation", "CoLA", "dev", 1043),
    ("sst2", "validation", "SST-2", "dev", 872),
    ("mrpc", "train", "MRPC", "train", 3668),
    ("mrpc", "validation", "MRPC", "dev", 408),
    ("stsb", "train", "STS-B", "train", 5749),
    ("stsb", "validation", "STS-B", "dev", 1500),
    ("qnli", "validation", "QNLI", "dev", 5463),
    ("rte", "train", "RTE", "train", 2490),
    ("rte", "validation", "RTE", "dev", 277),
    ("wnli", "train", "WNLI", "train", 635),
    ("wnli", "validation", "WNLI", "dev", 71),
    # Not in the shared data at the time of writing; checked if someone adds them.
    ("qqp", "train", "QQP", "train", 363846),
    ("qqp", "validation", "QQP", "dev", 40430),
    ("qnli", "train", "QNLI", "train", 104743),
    ("mnli", "train", "MNLI", "train", 392702),
    ("mnli", "validation_matched", "MNLI", "dev_matched", 9815),
    ("mnli", "validation_mismatched", "MNLI", "dev_mismatched", 9832),
]


@needs_real_glue
@pytest.mark.parametrize(("name", "split", "glue_dir", "stem", "row_count"), REAL_FILES)
def test_real_file_row_counts(name, split, glue_dir, stem, row_count):
    if real_glue_file(glue_dir, stem) is None:
        pytest.skip(f"{glue_dir}/{stem}.tsv is not in {REAL_GLUE_DIR}")
    examples = load_glue_split(name, REAL_GLUE_DIR, split)
    assert len(examples) == row_count
    assert [example.idx for example in examples] == list(range(row_count))
    task = get_task(name)
    assert all(len(example.texts) == len(task.text_fields) for example in examples)


@needs_real_glue
@pytest.mark.parametrize(
    ("name", "split", "counts"),
    [
        ("cola", "train", {"acceptable": 6023, "unacceptable": 2528}),
        ("cola", "validation", {"acceptable": 721, "unacceptable": 322}),
        ("sst2", "validation", {"positive": 444, "negative": 428}),
        ("mrpc", "train", {"equivalent": 2474, "not_equivalent": 1194}),
        ("mrpc", "validation", {"equivalent": 279, "not_equivalent": 129}),
        ("rte", "train", {"entailment": 1249, "not_entailment": 1241}),
        ("rte", "validation", {"entailment": 146, "not_entailment": 131}),
        ("qnli", "validation", {"entailment": 2702, "not_entailment": 2761}),
        ("wnli", "train", {"entailment": 312, "not_entailment": 323}),
        ("wnli", "validation", {"entailment": 31, "not_entailment": 40}),
    ],
)
def test_real_label_distributions(name, split, counts):
    task = get_task(name)
    examples = load_glue_split(task, REAL_GLUE_DIR, split)
    assert Counter(task.label_names[example.label] for example in examples) == counts


@needs_real_glue
@pytest.mark.parametrize("split", ["train", "validation"])
def test_real_stsb_scores_are_floats_within_0_and_5(split):
    scores = [example.label for example in load_glue_split("stsb", REAL_GLUE_DIR, split)]
    assert all(isinstance(score, float) and 0.0 <= score <= 5.0 for score in scores)
    assert min(scores) == 0.0 and max(scores) == 5.0


@needs_real_glue
def test_real_first_examples():
    cola = load_glue_split("cola", REAL_GLUE_DIR, "train")[0]
    assert cola == Example(
        texts=("Our friends won't buy this analysis, let alone the next one we propose.",), label=1, idx=0
    )
    # SST-2 text keeps its trailing space (as in the Hub copy); only labels are stripped.
    sst2 = load_glue_split("sst2", REAL_GLUE_DIR, "validation")[0]
    assert sst2 == Example(texts=("it 's a charming and often affecting journey . ",), label=1, idx=0)
    # MRPC starts with a UTF-8 BOM before the header; the columns must still be found.
    mrpc = load_glue_split("mrpc", REAL_GLUE_DIR, "validation")[0]
    assert mrpc.texts == (
        "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
        '" The foodservice pie business does not fit our long-term growth strategy .',
    )
    assert mrpc.label == 1
    stsb = load_glue_split("stsb", REAL_GLUE_DIR, "train")[1]
    assert stsb == Example(
        texts=("A man is playing a large flute.", "A man is playing a flute."), label=3.8, idx=1
    )
    rte = load_glue_split("rte", REAL_GLUE_DIR, "validation")[0]
    assert rte.texts[1] == "Christopher Reeve had an accident."
    assert get_task("rte").label_names[rte.label] == "not_entailment"
    # The CoLA dev file has no final newline: its last row must still be read.
    assert load_glue_split("cola", REAL_GLUE_DIR, "validation")[-1].idx == 1042


@needs_real_glue
def test_real_max_samples_keeps_the_first_rows():
    full = load_glue_split("rte", REAL_GLUE_DIR, "train")
    assert load_glue_split("rte", REAL_GLUE_DIR, "train", max_samples=5) == full[:5]
    assert len(load_glue_split("wnli", REAL_GLUE_DIR, "validation", max_samples=10_000)) == 71


@needs_real_glue
def test_real_load_glue_returns_train_and_dev(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    loaded = load_glue("RTE", REAL_GLUE_DIR)
    assert list(loaded) == ["train", "validation"]
    assert [len(examples) for examples in loaded.values()] == [2490, 277]


@needs_real_glue
def test_real_load_glue_reads_glue_dir_environment_variable(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(REAL_GLUE_DIR))
    loaded = load_glue("wnli", splits=["dev"], max_samples=3)
    assert list(loaded) == ["validation"]
    assert len(loaded["validation"]) == 3


@needs_real_glue
@pytest.mark.parametrize(
    ("name", "split", "expected_file"),
    [
        ("qqp", "train", "QQP/train.tsv"),
        ("qqp", "validation", "QQP/dev.tsv"),
        ("mnli", "train", "MNLI/train.tsv"),
        ("mnli", "validation_matched", "MNLI/dev_matched.tsv"),
        ("mnli", "validation_mismatched", "MNLI/dev_mismatched.tsv"),
        ("qnli", "train", "QNLI/train.tsv"),
    ],
)
def test_real_missing_files_name_the_file(name, split, expected_file):
    if (REAL_GLUE_DIR / expected_file).exists() or (REAL_GLUE_DIR / f"{expected_file}.gz").exists():
        pytest.skip(f"{expected_file} is present")
    with pytest.raises(DataError, match="file not found: tried") as error:
        load_glue_split(name, REAL_GLUE_DIR, split)
    assert str(REAL_GLUE_DIR / expected_file) in str(error.value)
    assert f"{REAL_GLUE_DIR / expected_file}.gz" in str(error.value)


@pytest.mark.slow
@needs_real_glue
def test_real_sst2_train():
    if real_glue_file("SST-2", "train") is None:
        pytest.skip("SST-2/train.tsv is not present")
    task = get_task("sst2")
    examples = load_glue_split(task, REAL_GLUE_DIR, "train")
    assert len(examples) == 67349
    assert Counter(task.label_names[example.label] for example in examples) == {
        "positive": 37569,
        "negative": 29780,
    }
    assert examples[0].texts == ("hide new secretions from the parental units ",)


# --- synthetic GLUE files: layouts --------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_synthetic_rte_plain_and_gz(tmp_path, gz):
    content = tsv(
        RTE_HEADER, ("0", "A cat sat.", "A cat.", "entailment"), ("1", "Rain.", "Sun.", "not_entailment")
    )
    write_file(tmp_path / "RTE" / "dev.tsv", content, gz=gz)
    assert load_glue_split("rte", tmp_path, "dev") == [
        Example(texts=("A cat sat.", "A cat."), label=0, idx=0),
        Example(texts=("Rain.", "Sun."), label=1, idx=1),
    ]


def test_plain_tsv_is_preferred_over_gz(tmp_path):
    write_file(tmp_path / "RTE" / "dev.tsv", tsv(RTE_HEADER, ("0", "plain", "b", "entailment")))
    write_file(tmp_path / "RTE" / "dev.tsv", tsv(RTE_HEADER, ("0", "gzipped", "b", "entailment")), gz=True)
    assert load_glue_split("rte", tmp_path, "validation")[0].texts[0] == "plain"


def test_labels_are_stripped_but_texts_are_not_and_crlf_and_blank_lines_are_handled(tmp_path):
    content = (
        "index\tsentence1\tsentence2\tlabel\r\n0\t A \tB \tentailment \r\n\n1\tC\tD\t not_entailment\r\n"
    )
    write_file(tmp_path / "RTE" / "train.tsv", content)
    assert load_glue_split("rte", tmp_path, "train") == [
        Example(texts=(" A ", "B "), label=0, idx=0),
        Example(texts=("C", "D"), label=1, idx=1),
    ]


def test_bare_quotes_and_stray_carriage_returns_stay_in_the_text(tmp_path):
    write_file(tmp_path / "CoLA" / "train.tsv", 'gj04\t1\t\tHe said " hi\rthere.\n')
    assert load_glue_split("cola", tmp_path, "train")[0].texts == ('He said " hi\rthere.',)


def test_stsb_columns_are_found_by_header_name(tmp_path):
    content = tsv(("score", "sentence2", "sentence1", "extra"), ("4.2", "second", "first", "x"))
    write_file(tmp_path / "STS-B" / "train.tsv", content)
    assert load_glue_split("STS-B", tmp_path, "train") == [
        Example(texts=("first", "second"), label=4.2, idx=0)
    ]


def test_synthetic_mnli_train_and_dev_layouts(tmp_path):
    train_header = (
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
        "label1",
        "gold_label",
    )
    dev_header = (*train_header[:11], "label2", "label3", "label4", "label5", "gold_label")
    parses = ("( p )", "( h )", "(ROOT p)", "(ROOT h)")
    write_file(
        tmp_path / "MNLI" / "train.tsv",
        tsv(
            train_header,
            ("0", "1", "1e", "fiction", *parses, "The premise.", "The hypothesis.", "neutral", "neutral"),
        ),
    )
    annotator_labels = ("contradiction", "contradiction", "neutral", "contradiction", "contradiction")
    dev_row = ("0", "1", "1e", "slate", *parses, "P.", "H.", *annotator_labels, "contradiction")
    write_file(tmp_path / "MNLI" / "dev_matched.tsv", tsv(dev_header, dev_row), gz=True)
    write_file(tmp_path / "MNLI" / "dev_mismatched.tsv", tsv(dev_header, dev_row))

    loaded = load_glue("mnli", tmp_path)
    assert list(loaded) == ["train", "validation_matched", "validation_mismatched"]
    assert loaded["train"] == [Example(texts=("The premise.", "The hypothesis."), label=1, idx=0)]
    assert loaded["validation_matched"] == [Example(texts=("P.", "H."), label=2, idx=0)]


def test_synthetic_qqp_and_mrpc_with_bom(tmp_path):
    write_file(
        tmp_path / "QQP" / "train.tsv",
        tsv(
            ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            ("7", "1", "2", "Why?", "Why so?", "1"),
        ),
    )
    assert load_glue_split("qqp", tmp_path, "train") == [Example(texts=("Why?", "Why so?"), label=1, idx=0)]
    mrpc = "\ufeff" + tsv(
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), ("0", "1", "2", "A .", "B .")
    )
    write_file(tmp_path / "MRPC" / "train.tsv", mrpc, gz=True)
    assert load_glue_split("mrpc", tmp_path, "train") == [Example(texts=("A .", "B ."), label=0, idx=0)]


# --- synthetic GLUE files: errors ---------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    with pytest.raises(
        DataError, match=r"GLUE data directory not found: .*nowhere \(pass --data-dir or set GLUE_DIR\)"
    ):
        load_glue_split("rte", tmp_path / "nowhere", "train")


def test_missing_file_lists_the_paths_tried(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError) as error:
        load_glue_split("rte", tmp_path, "train")
    expected = f"RTE train file not found: tried {tmp_path}/RTE/train.tsv or {tmp_path}/RTE/train.tsv.gz"
    assert str(error.value) == expected


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_bytes_name_the_line(tmp_path, gz):
    content = tsv(RTE_HEADER, ("0", "fine", "fine", "entailment")).encode() + b"1\tcaf\xe9\tx\tentailment\n"
    path = write_file(tmp_path / "RTE" / "train.tsv", content, gz=gz)
    with pytest.raises(DataError) as error:
        load_glue_split("rte", tmp_path, "train")
    assert str(error.value) == (
        f"{path}, line 3: byte 0xe9 at byte 6 of the line is not valid UTF-8; expected a UTF-8 text file"
    )


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("row", [("0", "only two"), ("0", "a", "b", "entailment", "extra")])
def test_wrong_number_of_columns(tmp_path, gz, row):
    path = write_file(
        tmp_path / "RTE" / "train.tsv", tsv(RTE_HEADER, ("0", "a", "b", "entailment"), row), gz=gz
    )
    with pytest.raises(DataError) as error:
        load_glue_split("rte", tmp_path, "train")
    assert str(error.value) == (
        f"{path}, line 3: expected 4 tab-separated columns (as in the header), found {len(row)}"
    )


def test_wrong_number_of_columns_in_headerless_cola(tmp_path):
    write_file(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\tA sentence.\n")
    with pytest.raises(
        DataError, match=r"dev.tsv, line 1: expected 4 tab-separated columns \(for CoLA\), found 3"
    ):
        load_glue_split("cola", tmp_path, "validation")


@pytest.mark.parametrize("gz", [False, True])
def test_missing_header_column(tmp_path, gz):
    header = STSB_HEADER[:-1] + ("similarity",)
    path = write_file(tmp_path / "STS-B" / "dev.tsv", tsv(header, stsb_row(0, "a", "b", "3.0")), gz=gz)
    with pytest.raises(DataError) as error:
        load_glue_split("stsb", tmp_path, "validation")
    message = str(error.value)
    assert message.startswith(f"{path}, line 1 (header): no column 'score'; the header has 'index', 'genre'")
    assert message.endswith("'sentence2', 'similarity'")


@pytest.mark.parametrize("gz", [False, True])
def test_label_outside_the_label_set(tmp_path, gz):
    content = tsv(RTE_HEADER, ("0", "a", "b", "entailment"), ("1", "c", "d", "maybe"))
    path = write_file(tmp_path / "RTE" / "dev.tsv", content, gz=gz)
    with pytest.raises(DataError) as error:
        load_glue_split("rte", tmp_path, "validation")
    assert str(error.value) == (
        f"{path}, line 3, column 4 ('label'): label 'maybe' is not a rte label; "
        "expected one of 'entailment', 'not_entailment'"
    )


def test_cola_label_outside_0_and_1(tmp_path):
    path = write_file(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tGood.\ngj04\t2\t*\tBad.\n")
    with pytest.raises(DataError) as error:
        load_glue_split("cola", tmp_path, "train")
    assert str(error.value) == (
        f"{path}, line 2, column 2 ('label'): label '2' is not a cola label; expected one of '0', '1'"
    )


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("score", ["high", "", "nan", "5.5", "-0.1"])
def test_regression_target_not_a_number_in_range(tmp_path, gz, score):
    content = tsv(STSB_HEADER, stsb_row(0, "a", "b", "3.0"), stsb_row(1, "c", "d", score))
    path = write_file(tmp_path / "STS-B" / "train.tsv", content, gz=gz)
    with pytest.raises(DataError) as error:
        load_glue_split("stsb", tmp_path, "train")
    assert str(error.value) == (
        f"{path}, line 3, column 10 ('score'): expected a number from 0 to 5, got {score!r}"
    )


@pytest.mark.parametrize("gz", [False, True])
def test_empty_split(tmp_path, gz):
    path = write_file(tmp_path / "RTE" / "dev.tsv", tsv(RTE_HEADER), gz=gz)
    with pytest.raises(DataError) as error:
        load_glue_split("rte", tmp_path, "validation")
    assert str(error.value) == f"{path}: no data rows; expected at least one example in the validation split"


@pytest.mark.parametrize("gz", [False, True])
def test_completely_empty_file(tmp_path, gz):
    path = write_file(tmp_path / "SST-2" / "train.tsv", "", gz=gz)
    with pytest.raises(DataError) as error:
        load_glue_split("sst2", tmp_path, "train")
    assert str(error.value) == f"{path}: the file is empty; expected a header line and data rows"


def test_headerless_cola_empty_file(tmp_path):
    write_file(tmp_path / "CoLA" / "dev.tsv", "")
    with pytest.raises(DataError, match="dev.tsv: no data rows"):
        load_glue_split("cola", tmp_path, "validation")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "RTE" / "train.tsv.gz"
    write_file(path, b"this is not gzip data\n")
    with pytest.raises(DataError, match=rf"^{path}: not a valid gzip file \("):
        load_glue_split("rte", tmp_path, "train")


def test_truncated_gzip(tmp_path):
    path = tmp_path / "RTE" / "train.tsv.gz"
    whole = gzip.compress(tsv(RTE_HEADER, *[("0", "a" * 50, "b" * 50, "entailment")] * 100).encode())
    write_file(path, whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"^{path}: not a valid gzip file"):
        load_glue_split("rte", tmp_path, "train")


def test_unknown_split_and_bad_max_samples(tmp_path):
    with pytest.raises(
        DataError, match="task mnli has no split 'validation'; expected one of train, validation_matched"
    ):
        load_glue_split("mnli", tmp_path, "validation")
    with pytest.raises(DataError, match="task rte has no split 'test'"):
        load_glue("rte", tmp_path, splits=["test"])
    with pytest.raises(DataError, match="max_samples must be a positive number of rows, got 0"):
        load_glue_split("rte", tmp_path, "train", max_samples=0)


def test_hub_fallback_without_datasets_installed(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as error:
        load_glue("rte")
    message = str(error.value)
    assert "pass --data-dir DIR" in message and "GLUE_DIR" in message and "readapt[hub]" in message
    assert "\n" not in message


def test_empty_glue_dir_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"readapt\[hub\]"):
        load_glue("sst2")


# --- custom tasks --------------------------------------------------------------------------------


def test_custom_csv_classification(tmp_path):
    train = write_file(
        tmp_path / "train.csv",
        'text,label,other\n"Great, really great",pos,x\nAwful,neg,y\n"He said ""no""",neg,z\n',
    )
    validation = write_file(tmp_path / "dev.csv", "label,text\npos,Fine\n neg ,Bad\n")
    task, splits = load_custom_task(train, validation, ["text"], "label")
    assert task.label_names == ("neg", "pos")
    assert not task.is_regression
    assert task.text_fields == ("text",)
    assert task.dev_splits == ("validation",)
    assert task.main_metric == "accuracy"
    assert splits["train"] == [
        Example(texts=("Great, really great",), label=1, idx=0),
        Example(texts=("Awful",), label=0, idx=1),
        Example(texts=('He said "no"',), label=0, idx=2),
    ]
    assert splits["validation"] == [
        Example(texts=("Fine",), label=1, idx=0),
        Example(texts=("Bad",), label=0, idx=1),
    ]
    assert task.format_text_to_text(splits["train"][1]) == "custom text: Awful"


def test_custom_csv_keeps_quoted_newlines_and_reports_record_start_lines(tmp_path):
    train = write_file(tmp_path / "train.csv", 'text,label\n"two\nlines",a\nok,b\n')
    validation = write_file(tmp_path / "dev.csv", 'text,label\n"multi\nline",a\nx,c\n')
    with pytest.raises(DataError) as error:
        load_custom_task(train, validation, ["text"], "label")
    assert str(error.value) == (
        f"{validation}, line 4, column 'label': label 'c' does not occur in the training file; "
        "expected one of 'a', 'b'"
    )
    task, splits = load_custom_task(train, None, ["text"], "label")
    assert splits["train"][0].texts == ("two\nlines",)


@pytest.mark.parametrize(("suffix", "line"), [(".csv", 3), (".jsonl", 2)])
def test_custom_empty_label(tmp_path, suffix, line):
    content = (
        "text,label\na,x\nb, \n"
        if suffix == ".csv"
        else '{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n'
    )
    train = write_file(tmp_path / f"train{suffix}", content)
    with pytest.raises(DataError) as error:
        load_custom_task(train, None, ["text"], "label")
    assert (
        str(error.value)
        == f"{train}, line {line}, column 'label': the label is empty; expected a class name or a number"
    )


@pytest.mark.parametrize("gz", [False, True])
def test_custom_tsv_pair_classification(tmp_path, gz):
    content = tsv(
        ("premise", "hypothesis", "label"), ('A "quoted" one', "B", "1"), ("C", "D", "0"), ("E", "F", "10")
    )
    train = write_file(tmp_path / "train.tsv", content, gz=gz)
    task, splits = load_custom_task(train, None, ("premise", "hypothesis"), "label", name="nli")
    assert task.label_names == ("0", "1", "10")  # integers sort numerically
    assert task.dev_splits == ()
    assert list(splits) == ["train"]
    assert splits["train"][0] == Example(texts=('A "quoted" one', "B"), label=1, idx=0)
    assert task.format_text_to_text(splits["train"][1]) == "nli premise: C hypothesis: D"


@pytest.mark.parametrize("gz", [False, True])
def test_custom_jsonl_auto_regression(tmp_path, gz):
    rows = [{"s": "a", "score": 0.5}, {"s": "b", "score": 3}, {"s": "c", "score": "4.25"}]
    train = write_file(tmp_path / "train.jsonl", "".join(json.dumps(row) + "\n" for row in rows), gz=gz)
    validation = write_file(tmp_path / "dev.jsonl", '{"s": "d", "score": 1.5}\n\n')
    task, splits = load_custom_task(train, validation, ["s"], "score")
    assert task.is_regression and task.num_labels == 1 and task.label_names == ()
    assert task.metric_names == ("pearson", "spearmanr") and task.main_metric == "combined"
    assert [example.label for example in splits["train"]] == [0.5, 3.0, 4.25]
    assert splits["validation"] == [Example(texts=("d",), label=1.5, idx=0)]


def test_custom_integer_labels_are_classes_unless_regression_is_asked(tmp_path):
    train = write_file(
        tmp_path / "train.jsonl", '{"t": "a", "y": 1}\n{"t": "b", "y": 5}\n{"t": "c", "y": 3}\n'
    )
    auto_task, auto_splits = load_custom_task(train, None, ["t"], "y")
    assert auto_task.label_names == ("1", "3", "5")
    assert [example.label for example in auto_splits["train"]] == [0, 2, 1]
    regression_task, regression_splits = load_custom_task(train, None, ["t"], "y", task_type="regression")
    assert regression_task.is_regression
    assert [example.label for example in regression_splits["train"]] == [1.0, 5.0, 3.0]


def test_custom_classification_forced_on_float_labels(tmp_path):
    train = write_file(tmp_path / "train.csv", "t,y\na,0.5\nb,1.5\n")
    task, splits = load_custom_task(train, None, ["t"], "y", task_type="classification")
    assert task.label_names == ("0.5", "1.5")
    assert [example.label for example in splits["train"]] == [0, 1]


def test_custom_missing_column_lists_the_columns(tmp_path):
    train = write_file(tmp_path / "train.csv", "sentence,label\na,1\n")
    with pytest.raises(DataError) as error:
        load_custom_task(train, None, ["text"], "label")
    assert (
        str(error.value) == f"{train}, line 1 (header): no column 'text'; the columns are 'sentence', 'label'"
    )


def test_custom_jsonl_missing_field_lists_the_fields(tmp_path):
    train = write_file(tmp_path / "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "y": 0}\n')
    with pytest.raises(DataError) as error:
        load_custom_task(train, None, ["text"], "label")
    assert str(error.value) == f"{train}, line 2: no field 'label'; the fields are 'text', 'y'"


def test_custom_validation_label_unseen_in_training(tmp_path):
    train = write_file(tmp_path / "train.tsv", tsv(("text", "label"), ("a", "pos"), ("b", "neg")))
    validation = write_file(
        tmp_path / "dev.tsv", tsv(("text", "label"), ("c", "pos"), ("d", "neutral")), gz=True
    )
    with pytest.raises(DataError) as error:
        load_custom_task(train, validation, ["text"], "label")
    assert str(error.value) == (
        f"{validation}, line 3, column 'label': label 'neutral' does not occur in the training file; "
        "expected one of 'neg', 'pos'"
    )


def test_custom_regression_target_not_a_number(tmp_path):
    train = write_file(tmp_path / "train.csv", "t,y\na,0.5\nb,high\n")
    with pytest.raises(DataError) as error:
        load_custom_task(train, None, ["t"], "y", task_type="regression")
    assert (
        str(error.value)
        == f"{train}, line 3, column 'y': expected a number for a regression task, got 'high'"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"t": "a", "y": 1}\n{"t": "b", "y": 1', "line 2, character 18: invalid JSON"),
        ('["t", "y"]\n', "line 1: expected a JSON object, got list"),
        ('{"t": 3, "y": 1}\n', "line 1, field 't': expected a string, got '3'"),
        ('{"t": "a", "y": null}\n', "line 1, field 'y': expected a label (string or number), got null"),
    ],
)
def test_custom_jsonl_errors(tmp_path, content, expected):
    train = write_file(tmp_path / "train.jsonl", content)
    with pytest.raises(DataError) as error:
        load_custom_task(train, None, ["t"], "y")
    assert str(error.value).startswith(f"{train}, {expected}")


@pytest.mark.parametrize("gz", [False, True])
def test_custom_errors_on_file_level(tmp_path, gz):
    wrong_columns = write_file(tmp_path / "cols.csv", "t,y\na,1\nb,1,extra\n", gz=gz)
    with pytest.raises(
        DataError, match=r"cols\.csv(\.gz)?, line 3: expected 2 columns \(as in the header\), found 3"
    ):
        load_custom_task(wrong_columns, None, ["t"], "y")
    not_utf8 = write_file(tmp_path / "latin1.tsv", b"t\ty\ncaf\xe9\t1\n", gz=gz)
    with pytest.raises(
        DataError, match=r"latin1\.tsv(\.gz)?, line 2: byte 0xe9 at byte 4 of the line is not valid UTF-8"
    ):
        load_custom_task(not_utf8, None, ["t"], "y")
    header_only = write_file(tmp_path / "empty.csv", "t,y\n", gz=gz)
    with pytest.raises(DataError, match=r"empty\.csv(\.gz)?: no data rows; expected at least one example"):
        load_custom_task(header_only, None, ["t"], "y")
    nothing = write_file(tmp_path / "nothing.tsv", "", gz=gz)
    with pytest.raises(DataError, match=r"nothing\.tsv(\.gz)?: the file is empty; expected a header line"):
        load_custom_task(nothing, None, ["t"], "y")


def test_custom_malformed_csv(tmp_path):
    train = write_file(tmp_path / "train.csv", 't,y\n"ok",1\n"bad"x,1\n')
    with pytest.raises(DataError, match=r"train\.csv, line 3: malformed CSV \("):
        load_custom_task(train, None, ["t"], "y")


def test_custom_argument_errors(tmp_path):
    train = write_file(tmp_path / "train.csv", "t,y\na,1\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.json'; expected \.csv, \.tsv or \.jsonl"):
        load_custom_task(tmp_path / "train.json", None, ["t"], "y")
    with pytest.raises(DataError, match=r"missing\.csv: file not found"):
        load_custom_task(tmp_path / "missing.csv", None, ["t"], "y")
    with pytest.raises(DataError, match="text_columns must name 1 or 2 columns"):
        load_custom_task(train, None, [], "y")
    with pytest.raises(DataError, match="text_columns must name 1 or 2 columns"):
        load_custom_task(train, None, ["a", "b", "c"], "y")
    with pytest.raises(DataError, match="task_type must be one of auto, classification, regression"):
        load_custom_task(train, None, ["t"], "y", task_type="ranking")  # type: ignore[arg-type]


def test_custom_max_samples_keeps_the_first_rows_but_all_labels(tmp_path):
    train = write_file(tmp_path / "train.csv", "t,y\na,x\nb,x\nc,z\n")
    validation = write_file(tmp_path / "dev.csv", "t,y\nd,z\ne,x\nf,x\n")
    task, splits = load_custom_task(train, validation, ["t"], "y", max_samples=2)
    assert task.label_names == ("x", "z")
    assert [example.texts[0] for example in splits["train"]] == ["a", "b"]
    assert [example.label for example in splits["validation"]] == [1, 0]
    with pytest.raises(DataError, match="max_samples must be a positive number of rows, got -1"):
        load_custom_task(train, None, ["t"], "y", max_samples=-1)
