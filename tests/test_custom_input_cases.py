"""Two custom-task inputs a new user hit: a row whose text cell is empty (refused, naming file, line and column), and
a directory given where a data file goes (said to be a directory, not an "unsupported file type")."""

from __future__ import annotations

import gzip

import pytest

from readapt.errors import DataError
from readapt.tasks.custom import load_custom_task
from readapt.tasks.files import read_lines


@pytest.mark.parametrize("name, content, line", [
    ("train.csv", 'text,label\n"fine",1\n"",0\n', 3),
    ("train.tsv", "text\tlabel\nfine\t1\n  \t0\n", 3),
    ("train.jsonl", '{"text": "fine", "label": 1}\n\n{"text": " ", "label": 0}\n', 3),
])
def test_an_empty_text_cell_is_refused_with_file_line_and_column(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_custom_task(path, None, ["text"], "label")
    assert str(error.value) == f"{path}, line {line}, column 'text': the text is empty; fill it in or remove the row"


def test_the_second_text_of_a_pair_is_checked_too(tmp_path):
    path = tmp_path / "pairs.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write("a,b,label\nx,y,1\nx,,0\n")
    with pytest.raises(DataError, match=r"pairs\.csv\.gz, line 3, column 'b': the text is empty"):
        load_custom_task(path, None, ["a", "b"], "label")


def test_a_directory_is_called_a_directory(tmp_path):
    for folder in (tmp_path / "data", tmp_path / "data.csv"):  # with no extension, and with a data file's one
        folder.mkdir()
        with pytest.raises(DataError) as error:
            load_custom_task(folder, None, ["text"], "label")
        assert str(error.value) == (f"{folder}: is a directory, not a file; expected a .csv, .tsv or .jsonl file "
                                    "(optionally .gz)")
        with pytest.raises(DataError, match=r": is a directory, not a file$"):
            list(read_lines(folder))
