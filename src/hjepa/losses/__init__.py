"""Prediction loss, anti-collapse regularisers and the objective that combines them."""

from hjepa.losses.combined import Objective
from hjepa.losses.contrastive import nt_xent
from hjepa.losses.prediction import prediction_loss
from hjepa.losses.sigreg import SIGReg, epps_pulley
from hjepa.losses.vicreg import VICReg

__all__ = [
    "Objective",
    "SIGReg",
    "VICReg",
    "epps_pulley",
    "nt_xent",
    "prediction_loss",
]
