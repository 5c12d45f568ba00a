"""DiNa-LRM: the diffusion-native latent reward model (architecture, checkpoints, losses, reward wrapper).

Importing this package loads torch and the model code; ``import rewards`` alone does not.
"""

from rewards.dina_lrm.checkpoint import load_dina_lrm, save_dina_lrm
from rewards.dina_lrm.config import DiNaLRMConfig, DiNaLRMConfigError
from rewards.dina_lrm.head import RewardHead
from rewards.dina_lrm.model import ADAPTER_NAME, DiNaLRM, TappedBackbone, sigma_grid, snap_sigmas

__all__ = [
    "ADAPTER_NAME",
    "DiNaLRM",
    "DiNaLRMConfig",
    "DiNaLRMConfigError",
    "RewardHead",
    "TappedBackbone",
    "load_dina_lrm",
    "save_dina_lrm",
    "sigma_grid",
    "snap_sigmas",
]
