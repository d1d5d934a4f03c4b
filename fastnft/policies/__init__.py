"""Flow policies: the state-based action expert (embedded default); pi0/pi0.5 plug in behind the same API."""

from fastnft.policies.normalizer import Normalizer
from fastnft.policies.state_flow import StateFlowPolicy

__all__ = ["Normalizer", "StateFlowPolicy"]
