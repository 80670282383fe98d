"""READ: frozen backbone, recurrent side network across its layers (the method itself lives in readapt.read)."""

from __future__ import annotations

from readapt.methods.base import Method
from readapt.read.config import ReadConfig
from readapt.read.model import ReadModel


class ReadMethod(Method):
    name = "read"
    default_lr = 1e-3
    backpropagates_through_backbone = False

    def validate_options(self, options):
        ReadConfig.from_dict(options)

    def prepare(self, backbone, options):
        return ReadModel(backbone, ReadConfig.from_dict(options))  # unknown options are an error

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, backbone, directory):
        return ReadModel.from_pretrained(backbone, directory)
