"""Examples -> token ids -> padded batches, for a classification/regression head, text-to-text (T5 style) or a
decoder-only LM (prompt, then the answer: label words or a completion).

Decoder-only batches are padded on the left, so that every row's answer ends at the last position: scoring and
the loss then need the LM head's logits for the last few positions only (`logits_to_keep`), not for all of them
(a 49k-word vocabulary makes those the biggest tensor of a step), and generation continues every row from the
same place. Explicit `position_ids` count real tokens only, so left padding does not shift any position."""

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


def candidates_for(task: Task, tokenizer, causal: bool = False) -> Candidates:
    values, texts = candidate_answers(task)
    if causal:
        return Candidates(values, tuple(tuple(causal_answer_ids(tokenizer, " " + t)) for t in texts))
    return Candidates(values, tuple(tuple(tokenizer(t).input_ids) for t in texts))


def end_of_answer_id(tokenizer) -> int:
    """The token a decoder-only LM writes after an answer (its EOS), so that it learns where to stop."""
    token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no end-of-sequence token; a decoder-only LM needs "
                        "one to end its answers")
    return token_id


def causal_answer_ids(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """An answer's tokens as they follow the prompt (no special tokens in front), then the end-of-answer token."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return (ids if max_length is None else ids[: max_length - 1]) + [end_of_answer_id(tokenizer)]


def _causal_prompt_ids(task: Task, example: Example, tokenizer, max_length: int) -> list[int]:
    if task.is_generation:  # a long prompt loses its beginning: what comes right before the answer matters most
        return tokenizer(task.format_causal_prompt(example)).input_ids[-max_length:]
    # classification: the texts are cut, never the answer cue after them
    cue = tokenizer("\nAnswer:", add_special_tokens=False).input_ids
    body = tokenizer(task.format_text_to_text(example), truncation=True, max_length=max(1, max_length - len(cue)))
    return body.input_ids + cue


def encode(task: Task, examples: list[Example], tokenizer, max_length: int, text_to_text: bool,
           causal: bool = False) -> list[dict]:
    """Token ids per example: `input_ids` (the input, or the prompt of a decoder-only LM), `labels` (class, score,
    or the target tokens of a text-to-text or decoder-only LM) and `value` (the label itself)."""
    if not examples:
        raise DataError(f"task {task.name}: nothing to encode (empty split)")
    if causal:
        return [{"input_ids": _causal_prompt_ids(task, e, tokenizer, max_length),
                 "labels": causal_answer_ids(tokenizer, task.label_to_text(e.label) if task.is_generation
                                             else " " + task.label_to_text(e.label), max_length),
                 "value": e.label} for e in examples]
    if task.is_generation and not text_to_text:
        raise DataError(f"task {task.name} is a generation task; it needs a decoder (a seq2seq or causal LM)")
    if text_to_text:
        texts = [e.texts[0] if task.is_generation else task.format_text_to_text(e) for e in examples]
        inputs = tokenizer(texts, truncation=True, max_length=max_length)
        targets = tokenizer([task.label_to_text(e.label) for e in examples]).input_ids
        return [{"input_ids": ids, "labels": target, "value": e.label}
                for ids, target, e in zip(inputs.input_ids, targets, examples, strict=True)]
    columns = list(zip(*(e.texts for e in examples), strict=True))
    encoded = tokenizer(*columns[:2], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": e.label, "value": e.label}
            for ids, e in zip(encoded.input_ids, examples, strict=True)]


class Collator:
    """Pads a list of encoded examples into a batch (dynamic padding: to the longest in the batch).

    Decoder-only (`causal`): with `with_answers` each row is prompt + answer, `labels` the answer's tokens at their
    positions (IGNORE_INDEX elsewhere); without, the prompts alone (scoring candidates, generating)."""

    def __init__(self, pad_token_id: int, text_to_text: bool, is_regression: bool, causal: bool = False,
                 with_answers: bool = True):
        self.pad_token_id = pad_token_id
        self.text_to_text = text_to_text
        self.is_regression = is_regression
        self.causal = causal
        self.with_answers = with_answers

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.causal:
            return self._causal(features)
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

    def _causal(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [list(f["input_ids"]) for f in features]
        if not self.with_answers:
            return left_padded(prompts, self.pad_token_id)
        answers = [list(f["labels"]) for f in features]
        batch = left_padded([p + a for p, a in zip(prompts, answers, strict=True)], self.pad_token_id)
        batch["labels"] = _pad([a[::-1] for a in answers], IGNORE_INDEX).flip(-1)  # the answers, right-aligned
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.cat([torch.full((len(features), width - batch["labels"].shape[1]), IGNORE_INDEX),
                                     batch["labels"]], dim=1)
        return batch


def left_padded(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (0, 1, ... over the real tokens) of rows padded on the left."""
    input_ids = _pad([r[::-1] for r in rows], pad_token_id).flip(-1)
    attention_mask = _pad([[1] * len(r) for r in rows], 0).flip(-1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
