"""Loading and generation settings shared by the recipe, the CLI and the loaders (not READ's own knobs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from readapt.errors import ConfigError

# Weights of a frozen backbone (`readapt train --backbone-dtype`), and values in a feature cache (--cache-dtype).
# int8 / int4: quantized by one of transformers' quantization integrations (readapt.quantization).
QUANTIZED_BACKBONE_DTYPES = ("int8", "int4")
BACKBONE_DTYPES = ("float32", "bfloat16", "float16", *QUANTIZED_BACKBONE_DTYPES)
CACHE_DTYPES = ("float16", "bfloat16", "float32")

# How a decoder-only backbone answers a classification or regression task: its own LM head ranks the label
# words after a prompt (rank classification, as for T5), or a new sequence-classification head reads the last token.
DECODER_HEADS = ("label-words", "classifier")


@dataclass(frozen=True)
class GenerationSettings:
    """How generation tasks are evaluated: passed to transformers' `generate` (greedy unless do_sample)."""

    max_new_tokens: int = field(default=32, metadata={
        "help": "generation tasks: longest completion generated at evaluation", "type": "positive_int"})
    do_sample: bool = field(default=False, metadata={"help": "generation tasks: sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "with --do-sample"})
    top_p: float = field(default=1.0, metadata={"help": "with --do-sample"})
    top_k: int = field(default=50, metadata={"help": "with --do-sample"})
    num_beams: int = field(default=1, metadata={"help": "beam search width", "type": "positive_int"})

    def validate(self) -> None:
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature > 0,
                  "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0, "num_beams": self.num_beams >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:  # transformers warns about sampling settings that greedy decoding ignores
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
