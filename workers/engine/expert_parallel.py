"""This rank's place in an expert-parallel group: which experts it holds and how tokens reach them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moecluster.kernels.stable_argsort import stable_argsort
from moecluster.router.experts.all_to_all import AllToAllDispatch
from moecluster.router.experts.dispatch import Dispatcher, LocalDispatch
from moecluster.router.experts.placement import ExpertPlacement
from moecluster.workers.config import ModelConfig


@dataclass(frozen=True)
class ExpertParallel:
    rank: int
    world: int
    group: Any = None  # the torch.distributed group of the EP ranks (None: the default group)
    redundant_slots: int = 0

    def experts_and_dispatcher(self, cfg: ModelConfig, device: torch.device) -> tuple[list[int], Dispatcher]:
        """This rank's experts and dispatcher. A group of one without replica slots holds every
        expert and dispatches locally (no collectives, no host sync: its decode steps can run as
        CUDA graphs)."""
        if self.world == 1 and not self.redundant_slots:
            return list(range(cfg.n_routed_experts)), LocalDispatch(cfg.n_routed_experts, stable_argsort)
        placement = ExpertPlacement.contiguous(cfg.n_routed_experts, self.world, self.redundant_slots)
        return placement.local_experts(self.rank), AllToAllDispatch(placement, self.rank, self.group, device)
