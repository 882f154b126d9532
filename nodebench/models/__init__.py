"""Models of Table 1 (Chen et al. 2018) and their ANODE variant (Dupont et al. 2019).

Models compute only: no counters or timers live here. Instruments find ODE dynamics by type
(:class:`Dynamics`) and observe them from outside.
"""

from .blocks import ConvODEFunc, Dynamics, ODEBlock
from .classifiers import mlp, odenet, resnet

__all__ = ["ConvODEFunc", "Dynamics", "ODEBlock", "mlp", "odenet", "resnet"]
