"""Prompt tuning through peft: learned virtual tokens prepended to the input embeddings; the backbone is
frozen, the task head trained."""

from __future__ import annotations

from readapt.errors import UnsupportedModelError
from readapt.methods.base import PartialMethod, require_positive_int
from readapt.methods.lora import peft_task_type


class PromptTuning(PartialMethod):
    name = "prompt"
    default_lr = 3e-2  # prompt tuning needs large rates (Lester et al. 2021 used 0.3 with Adafactor)
    defaults = {"num_virtual_tokens": 20}

    def options(self, options):
        options = super().options(options)
        require_positive_int(self.name, options, "num_virtual_tokens")
        return options

    def build(self, backbone, options, info):
        if info.family == "decoder-only" and info.head_modules:
            # Decoder-only sequence classification pools the last non-padding token, which transformers
            # finds from input_ids; with prompts peft passes inputs_embeds instead, so the head would read a
            # padding position of right-padded batches. Refused rather than silently wrong.
            raise UnsupportedModelError(
                f"prompt tuning does not support decoder-only sequence classification ({type(backbone).__name__}): "
                "the head would pool a padding position; use a causal-LM backbone with label words"
            )
        from peft import PromptTuningConfig, get_peft_model

        config = PromptTuningConfig(task_type=peft_task_type(info), num_virtual_tokens=options["num_virtual_tokens"],
                                    modules_to_save=list(info.head_modules) or None)
        return get_peft_model(backbone, config)
