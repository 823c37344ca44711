"""The project's one cost model: cost values, the hook counter, the analytic plan costs and the ViT count.

``counting`` measures a built model (the one MACs counter), ``analytic`` predicts the cost of a pruning plan
from a dependency graph (checked against the counter), ``latency`` predicts the measured latency of a plan on one
device setting from per-op tables (``measure_latency`` times built models), ``vit`` counts the AgentViT model by
kept tokens.
"""
from pruning_env.costs.cost import Cost, Reductions, reductions
from pruning_env.costs.counting import (ATTENTION_TYPES, NORM_MACS_PER_ELEMENT, attention_macs, count_costs,
                                        count_params, layer_macs)
from pruning_env.costs.latency import LatencyModel, LatencySetting, measure_latency, measure_latency_rounds
from pruning_env.costs.vit import state_macs, vit_gflops, vit_macs

__all__ = ["Cost", "Reductions", "reductions", "NORM_MACS_PER_ELEMENT", "ATTENTION_TYPES", "attention_macs",
           "count_costs", "count_params", "layer_macs", "vit_macs", "vit_gflops", "state_macs", "LatencyModel",
           "LatencySetting", "measure_latency", "measure_latency_rounds"]
