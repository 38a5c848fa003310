"""Serving models larger than VRAM: the budget planner, the pinned host arena, and the layer streamer.

See DESIGN.md "Offload pipeline". `planner` and `stats` import no torch.
"""

from vramlite.engine.offload.planner import OffloadPlan, format_bytes, min_budget, plan_offload
from vramlite.engine.offload.stats import OffloadStats, StatsSnapshot
from vramlite.engine.offload.weight_store import WeightStore, layer_sizes, tensor_bytes

__all__ = ["OffloadPlan", "OffloadStats", "StatsSnapshot", "WeightStore", "format_bytes", "layer_sizes",
           "min_budget", "plan_offload", "tensor_bytes"]
