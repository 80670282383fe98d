"""LoRA through peft: low-rank updates of the attention projections, the task head trained in full."""

from __future__ import annotations

from readapt.errors import ConfigError
from readapt.methods.base import PartialMethod, require_positive_int


def peft_task_type(info) -> str:
    """peft's task type for a readapt backbone: text-to-text, sequence classification or causal LM."""
    if info.family == "encoder-decoder":
        return "SEQ_2_SEQ_LM"
    return "SEQ_CLS" if info.head_modules else "CAUSAL_LM"


class LoRA(PartialMethod):
    name = "lora"
    default_lr = 5e-4
    # r=8, alpha=8 as in the READ author's code; target_modules "" = peft's per-architecture default, the
    # attention projections (query/value for BERT, q/v for T5, q_proj/v_proj for Llama, c_attn for GPT-2).
    defaults = {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ""}

    def options(self, options):
        options = super().options(options)
        require_positive_int(self.name, options, "r", "alpha")
        if not 0 <= options["dropout"] < 1:
            raise ConfigError(f"lora option dropout={options['dropout']} is out of range [0, 1)")
        return options

    def build(self, backbone, options, info):
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in options["target_modules"].split(",") if t.strip()] or None
        config = LoraConfig(task_type=peft_task_type(info), r=options["r"], lora_alpha=options["alpha"],
                            lora_dropout=options["dropout"], target_modules=targets,
                            modules_to_save=list(info.head_modules) or None)
        try:
            return get_peft_model(backbone, config)
        except ValueError as exc:  # e.g. no module matches target_modules
            raise ConfigError(f"lora cannot attach to {type(backbone).__name__}: {str(exc).splitlines()[0]}") from None
