"""How a model's answers are computed when they are words: rank classification over candidate answers (T5 and
decoder-only LMs), the decoder-only training loss, and generation for generation tasks.

Every function takes the model to train or evaluate as it is (a ReadModel, a peft model, a backbone with
adapters inside): the answers come out of the backbone's own LM head and `generate`, so every method is scored
the same way. Decoder-only batches are left-padded with explicit position ids (readapt.encoding), so answers end at
the last position and only the last few positions' logits are ever computed (`logits_to_keep`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from readapt.encoding import IGNORE_INDEX, Candidates, end_of_answer_id
from readapt.errors import ConfigError
from readapt.read.model import ReadModel
from readapt.settings import GenerationSettings


def base_model(model):
    """The Hugging Face model inside a method's wrapper (ReadModel, peft), whose forward arguments count."""
    model = getattr(model, "module", model)  # a data-parallel wrapper
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return getattr(model, "backbone", model)


def no_kv_cache(model) -> dict[str, bool]:
    """Scoring and training never reuse a KV cache; building one (decoder-only, seq2seq) only costs memory."""
    return {"use_cache": False} if "use_cache" in inspect.signature(base_model(model).forward).parameters else {}


def _prompt_learning(model) -> bool:
    return getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)


def lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
              keep: int) -> torch.Tensor:
    """A decoder-only LM's logits for the last `keep` positions of a left-padded batch: (batch, keep, vocabulary)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **no_kv_cache(model)}
    if position_ids is not None and not _prompt_learning(model):  # peft's prompt tuning ignores them, with a warning
        kwargs["position_ids"] = position_ids
    return model(**kwargs, **_keep(model, keep)).logits[:, -keep:]


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a left-padded prompt + answer batch (labels: IGNORE_INDEX on
    padding and prompt), as the LM's own loss would give, from the logits of the answer positions only."""
    labels = batch["labels"]
    answer_columns = (labels != IGNORE_INDEX).any(0).nonzero()
    if answer_columns.numel() == 0:
        raise ValueError("a decoder-only batch without answer tokens")
    # the logit at position t predicts token t + 1: one more position than the longest answer
    keep = labels.shape[1] - int(answer_columns[0]) + 1
    logits = lm_logits(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"), keep)
    targets = labels[:, -(keep - 1):]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def candidate_scores(model, batch: dict, candidates: Candidates, causal: bool = False) -> torch.Tensor:
    """Total log-likelihood of every candidate answer for every example: (batch, candidates)."""
    return (_causal_candidate_scores if causal else _seq2seq_candidate_scores)(model, batch, candidates)


def _seq2seq_candidate_scores(model, batch: dict, candidates: Candidates) -> torch.Tensor:
    # The encoder runs once; its output (with READ's corrected states attached) serves every candidate.
    # Prompt tuning changes the encoder's input (virtual tokens), so there the whole model runs per candidate.
    inputs = {"input_ids": batch["input_ids"]} if _prompt_learning(model) else {
        "encoder_outputs": model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])}
    size = batch["input_ids"].shape[0]
    scores = []
    for token_ids in candidates.token_ids:
        labels = torch.tensor(token_ids, device=batch["input_ids"].device).repeat(size, 1)
        logits = model(**inputs, attention_mask=batch["attention_mask"], labels=labels, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        scores.append(log_probs.sum(-1))
    return torch.stack(scores, dim=-1)


def _causal_candidate_scores(model, batch: dict, candidates: Candidates) -> torch.Tensor:
    if _can_continue_a_kv_cache(model):
        return _causal_scores_from_prompt_cache(model, batch, candidates)
    # Left-padded prompts: a candidate appended to every row ends all rows at the same position.
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    scores = []
    for token_ids in candidates.token_ids:
        answer = torch.tensor(token_ids, device=input_ids.device).expand(input_ids.shape[0], -1)
        full_mask = torch.cat([attention_mask, torch.ones_like(answer)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm_logits(model, torch.cat([input_ids, answer], dim=1), full_mask, positions, answer.shape[1] + 1)
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, answer.unsqueeze(-1)).squeeze(-1)
        scores.append(log_probs.sum(-1))
    return torch.stack(scores, dim=-1)


# Methods whose model continues a KV cache exactly as it computes a whole sequence: the backbone's own layers
# (full, LoRA, BitFit, adapters) or READ's per-token correction. Not prompt tuning (peft owns the cache's
# virtual-token prefix), LST (its side network keeps no cache) or READ with a running-mean sequence context or a token mixer.
_CACHE_SAFE_METHODS = ("lora", "bitfit", "adapter")


def _can_continue_a_kv_cache(model) -> bool:
    inner = getattr(model, "module", model)
    if isinstance(inner, ReadModel):
        config = inner.read_config  # a running mean or a token mixer needs every earlier token at each step
        return config.sequence_context == "none" and not config.token_mixer_layers
    metadata = inner.__dict__.get("readapt_metadata")
    if metadata is None:  # full fine-tuning (the backbone itself) or a plain transformers model
        return hasattr(inner, "config") and not _prompt_learning(inner)
    return metadata.get("method") in _CACHE_SAFE_METHODS


def _causal_scores_from_prompt_cache(model, batch: dict, candidates: Candidates) -> torch.Tensor:
    """The prompts run once (keeping their KV cache); then every candidate continues each prompt's cache in one
    pass of batch × candidates rows, candidates right-padded (causal: padding after a token never changes it)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    size, count = input_ids.shape[0], len(candidates.token_ids)
    positions = batch.get("position_ids", (attention_mask.cumsum(-1) - 1).clamp(min=0))
    prompt = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   **_keep(model, 1))
    cache = prompt.past_key_values  # None where READ replays shared stack states (run_adapters): nothing to continue
    if cache is not None:
        cache.batch_repeat_interleave(count)  # row i*count + k: prompt i, candidate k
    longest = max(len(t) for t in candidates.token_ids)
    answers = torch.zeros(count, longest, dtype=torch.long, device=input_ids.device)
    answer_mask = torch.zeros(count, longest, dtype=torch.long, device=input_ids.device)
    for k, token_ids in enumerate(candidates.token_ids):
        answers[k, : len(token_ids)] = torch.tensor(token_ids, device=input_ids.device)
        answer_mask[k, : len(token_ids)] = 1
    answers, answer_mask = answers.repeat(size, 1), answer_mask.repeat(size, 1)
    full_mask = torch.cat([attention_mask.repeat_interleave(count, 0), torch.ones_like(answers)], dim=1)
    answer_positions = positions[:, -1:].repeat_interleave(count, 0) + 1 + torch.arange(longest, device=answers.device)
    logits = model(input_ids=answers, attention_mask=full_mask, position_ids=answer_positions, cache=cache,
                   use_cache=True).logits
    # the first answer token is predicted by the prompt's last position, the others by the answer before them
    first = prompt.logits[:, -1].float().log_softmax(-1).repeat_interleave(count, 0)
    rest = logits[:, :-1].float().log_softmax(-1)
    log_probs = torch.cat([first.gather(-1, answers[:, :1]),
                           rest.gather(-1, answers[:, 1:].unsqueeze(-1)).squeeze(-1)], dim=1)
    return (log_probs * answer_mask).sum(-1).view(size, count)


def _keep(model, keep: int) -> dict:
    """Ask for the last `keep` positions' logits only, where the model can (transformers' logits_to_keep)."""
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(base_model(model).forward).parameters else {}


@torch.no_grad()
def generate_texts(model, batch: dict, tokenizer, settings: GenerationSettings, causal: bool) -> list[str]:
    """The model's completions for a batch of prompts (left-padded for a decoder-only LM), as text."""
    if not hasattr(model, "generate"):
        raise ConfigError(f"{type(model).__name__} cannot generate; generation tasks need a model with generate()")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    stop = {}
    if causal:  # stop at the token training put after every answer, as well as at the model's own EOS
        configured = getattr(getattr(base_model(model), "generation_config", None), "eos_token_id", None)
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        stop["eos_token_id"] = sorted({*ids, end_of_answer_id(tokenizer)})
    output = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id, **stop)
    new_tokens = output[:, inputs["input_ids"].shape[1]:] if causal else output  # a decoder-only LM repeats the prompt
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
