"""Analytical hardware model: platform as data, model shape in, memory/latency/energy out.

Pure Python (PyYAML; numpy only to count zeros in a checkpoint). Never imports torch.
"""

from slmsearch.hwmodel.deployment import Deployment
from slmsearch.hwmodel.estimate import Estimate, OpRow, PassEstimate, estimate
from slmsearch.hwmodel.memory import MemoryReport
from slmsearch.hwmodel.placement import Placement
from slmsearch.hwmodel.platform import Platform, load_platform
from slmsearch.hwmodel.shape import Adapter, LayerShape, ModelShape, Sparsity, TensorFormat

__all__ = [
    "Adapter", "Deployment", "Estimate", "LayerShape", "MemoryReport", "ModelShape", "OpRow", "PassEstimate",
    "Placement", "Platform", "Sparsity", "TensorFormat", "estimate", "load_platform",
]
