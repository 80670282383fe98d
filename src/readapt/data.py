"""Examples -> token ids -> padded batches, for a classification/regression head or text-to-text (T5 style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from readapt.errors import DataError
from readapt.tasks import Example, Task, stsb_to_text

IGNORE_INDEX = -100  # label positions the loss skips (padding of text-to-text targets)


@dataclass(frozen=True)
class Candidates:
    """What a text-to-text model may answer: label values and their target token ids (rank classification)."""

    values: tuple[int | float, ...]
    token_ids: tuple[tuple[int, ...], ...]


def candidate_answers(task: Task) -> tuple[tuple[int | float, ...], list[str]]:
    """The answers a text-to-text model may give: label values and their target texts."""
    if task.is_regression:
        # STS-B as in the T5 paper: the score rounded to 0.2, so 26 possible answers 0.0 ... 5.0.
        low, high = task.target_range or (0.0, 5.0)
        values = tuple(round(low + 0.2 * i, 1) for i in range(int(round((high - low) / 0.2)) + 1))
        return values, [stsb_to_text(v) for v in values]
    values = tuple(range(task.num_labels))
    return values, [task.label_to_text(v) for v in values]


def candidates_for(task: Task, tokenizer) -> Candidates:
    values, texts = candidate_answers(task)
    return Candidates(values, tuple(tuple(tokenizer(t).input_ids) for t in texts))


def encode(task: Task, examples: list[Example], tokenizer, max_length: int, text_to_text: bool) -> list[dict]:
    if not examples:
        raise DataError(f"task {task.name}: nothing to encode (empty split)")
    if text_to_text:
        inputs = tokenizer([task.format_text_to_text(e) for e in examples], truncation=True, max_length=max_length)
        targets = tokenizer([task.label_to_text(e.label) for e in examples]).input_ids
        return [{"input_ids": ids, "labels": target, "value": e.label}
                for ids, target, e in zip(inputs.input_ids, targets, examples, strict=True)]
    columns = list(zip(*(e.texts for e in examples), strict=True))
    encoded = tokenizer(*columns[:2], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": e.label, "value": e.label}
            for ids, e in zip(encoded.input_ids, examples, strict=True)]


class Collator:
    """Pads a list of encoded examples into a batch (dynamic padding: to the longest in the batch)."""

    def __init__(self, pad_token_id: int, text_to_text: bool, is_regression: bool):
        self.pad_token_id = pad_token_id
        self.text_to_text = text_to_text
        self.is_regression = is_regression

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], self.pad_token_id),
            "attention_mask": _pad([[1] * len(f["input_ids"]) for f in features], 0),
        }
        if self.text_to_text:
            batch["labels"] = _pad([f["labels"] for f in features], IGNORE_INDEX)
        else:
            dtype = torch.float32 if self.is_regression else torch.long
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        return batch


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
