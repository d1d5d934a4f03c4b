"""The StepNFT loop: rollout (Flow-SDE sampling with the EMA policy, S2–S3), actor update (labels S4, loss S5–S8),
the trainer that runs iterations with EMA (S9), checkpoints and periodic evaluation, success-rate evaluation, and
CUDA-graph capture of the sampler.

Layer: above the math (``sde``, ``nft``), kernels, policies, envs and engine; below the entry points
(``fastnft.train``, ``fastnft.cli``) and the experiment drivers (``fastnft.experiments``).
"""
