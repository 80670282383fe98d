"""READ behind the method interface: frozen backbone, recurrent side network across its layers (readapt.read)."""

from __future__ import annotations

import torch

from readapt.backbone import ENCODER_ONLY
from readapt.methods.base import Method
from readapt.read.config import ReadConfig
from readapt.read.model import ReadModel

FIRST_TOKEN = slice(0, 1)


class ReadMethod(Method):
    name = "read"
    default_lr = 1e-3
    backpropagates_through_backbone = False
    supports_backbone_placement = True
    corrects_positions = True

    def validate_options(self, options):
        ReadConfig.from_dict(options)

    def prepare(self, backbone, options):
        return ReadModel(backbone, ReadConfig.from_dict(options))  # unknown options are an error

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, backbone, directory):
        return ReadModel.from_pretrained(backbone, directory)

    def default_epochs(self, train_rows: int) -> int:
        # With the feature cache an epoch costs a small fraction of the first (the backbone runs once), so small
        # data sets get more passes; the selection split (or dev) picks the epoch.
        return 10 if train_rows <= 2000 else 5 if train_rows <= 10000 else 3

    def default_options(self, train_rows: int) -> dict:
        return {"train_rows": train_rows}  # what the auto width is sized for (ReadConfig.train_rows)

    def feature_cache_problem(self, options):
        if ReadConfig.from_dict(options).couple_encoder:
            return ("decoupled READ: with --couple-encoder the backbone decoder consumes the trained encoder "
                    "correction, so its states change during training")
        return None

    def corrects_first_token_only(self, model: ReadModel, probe: dict[str, torch.Tensor]) -> bool:
        """An encoder whose task head reads [CLS] and nothing else (noise in every other position leaves the
        logits bit for bit the same), and nothing that mixes the tokens (the "mean" context, a token mixer): the logits
        are then those of the full correction to float rounding, and the side network (and the feature cache)
        works on one position."""
        if model.info.family != ENCODER_ONLY or len(model.adapted_stacks) != 1:
            return False
        if model.read_config.mixes_tokens or model.read_config.couple_encoder:
            return False
        device = next(p for p in model.parameters() if p.requires_grad).device
        was_training = model.training
        model.eval()  # the head's dropout would make the two probe passes differ
        try:
            return model.head_reads_only(FIRST_TOKEN, **{k: v.to(device) for k, v in probe.items()})
        finally:
            model.train(was_training)
