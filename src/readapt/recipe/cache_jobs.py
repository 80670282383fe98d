"""--cache-features in the training recipe: one feature-cache entry per split, planned while its loader is made,
checked against the size budget before anything is written, then built or reused at the start of epoch 1."""

from __future__ import annotations

from typing import Any

import numpy as np

from readapt.answers import candidate_scores, no_kv_cache
from readapt.encoding import Candidates, Collator
from readapt.read.cache import CachedCollator, FeatureCache, indexed
from readapt.read.side_network import second_text_start


class CacheJobs:
    """--cache-features in the training loop: one entry per split, planned while its loader is made (`attach`),
    all checked against the size budget before anything is written, then built or reused (`build`)."""

    def __init__(self, config, model, loaded):
        self.model = model
        self.text_to_text = loaded.text_to_text
        self.cache = FeatureCache(model, loaded.tokenizer, max_length=config.max_length,
                                  text_to_text=loaded.text_to_text, directory=config.cache_dir,
                                  dtype=config.cache_dtype, max_gb=config.cache_max_gb, autocast=config.mixed_precision)
        self.jobs: list[tuple[Any, list[dict], Collator, Candidates | None, bool]] = []
        self.collators: list[CachedCollator] = []

    def attach(self, label: str, features: list[dict], collator: Collator, candidates: Candidates | None,
               training: bool = False) -> tuple[list[dict], CachedCollator]:
        plan = self.cache.plan(label, self.stack_calls(features, candidates))
        self.jobs.append((plan, features, collator, candidates, training))
        self.collators.append(CachedCollator(collator, plan))
        return indexed(features), self.collators[-1]

    def replay_first_token_only(self, read_config) -> None:
        """The model corrects [CLS] alone: every split replays that position (and the pooled means) only."""
        context = read_config.sequence_context
        for (_plan, features, *_), collator in zip(self.jobs, self.collators, strict=True):
            collator.first_token, collator.pooled = True, context in ("pooled", "segments")
            if context == "segments":  # where each example's second text starts, from its token ids
                collator.second_text_starts = np.array(
                    [second_text_start(f["input_ids"], read_config.separator_token_id) for f in features], dtype=np.int64)

    def stack_calls(self, features: list[dict], candidates: Candidates | None) -> list[tuple[str, list[list[int]]]]:
        """The adapted stack calls of one forward pass (training step, or prediction when scoring candidates),
        in call order, with every example's tokens: what the cache stores for each."""
        stacks = [s.name for s in self.model.adapted_stacks]
        inputs = [f["input_ids"] for f in features]
        if not self.text_to_text:
            return [(stacks[0], inputs)]
        calls = [("encoder", inputs)] if "encoder" in stacks else []
        if "decoder" in stacks:
            if candidates is None:
                calls.append(("decoder", [f["labels"] for f in features]))
            else:
                calls.extend(("decoder", [list(ids)] * len(features)) for ids in candidates.token_ids)
        return calls

    def build(self, model, accelerator, batch_size: int, progress: bool) -> None:
        """Open or build every entry, running the model exactly as training and prediction call it."""
        unwrapped = accelerator.unwrap_model(model)  # what predict() gets
        no_cache = no_kv_cache(unwrapped)
        for plan, features, collator, candidates, training in self.jobs:
            if training:  # the unwrapped model: a data-parallel wrapper would synchronise with idle processes
                def run(batch):
                    return unwrapped(**batch, **no_cache)
            elif candidates is None:
                def run(batch):
                    return unwrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache)
            else:
                def run(batch, candidates=candidates):
                    return candidate_scores(unwrapped, batch, candidates)
            self.cache.open_or_build(plan, run, features, collator, batch_size, accelerator.device, progress=progress)

    def summary(self) -> dict[str, Any]:
        plans = [job[0] for job in self.jobs]
        return {
            "directory": str(self.cache.directory), "dtype": self.cache.dtype,
            "bytes": sum(p.entry.bytes for p in plans if p.entry is not None),
            "reused": all(p.reused for p in plans), "build_seconds": sum(p.build_seconds for p in plans),
            "build_cpu_seconds": sum(p.build_cpu_seconds for p in plans),
            "fingerprint_seconds": self.cache.fingerprint_seconds,
            "entries": {p.label: p.summary() for p in plans},
        }
