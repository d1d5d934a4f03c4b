"""Experiment drivers built on the StepNFT loop: motion-planned demonstrations, few-shot flow-matching SFT, the
pipeline (demos -> SFT -> StepNFT -> held-out evaluation) and multi-run grids (several SFT starts, seeds and control
arms, summarised with intervals).

Layer: above :mod:`fastnft.loop`; only the entry points (``fastnft.cli``, ``fastnft.train``) and the doctor import it.
"""
