"""The embedding tables every family uses: a token embedding may stay in host memory while the model runs on a
GPU."""

from __future__ import annotations

import torch
from torch import nn


class Embedding(nn.Embedding):
    """nn.Embedding that looks rows up where its table lives and hands them to the ids' device.

    Under a memory limit an input embedding that the LM head does not share stays in host memory (see
    `OffloadPlan.host_fixed_bytes`): a decode step then copies one row per token instead of the table
    taking VRAM.
    """

    def reset_parameters(self) -> None:
        """No random init: every table is read from the checkpoint. (nn.Embedding's `normal_` on the meta
        device, where models are built, imports torch._dynamo: 1.5 s of every start-up.)"""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.device == ids.device:
            return super().forward(ids)
        return super().forward(ids.to(self.weight.device)).to(ids.device)
