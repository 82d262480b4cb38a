"""Prediction loss and anti-collapse regularisers."""

from hjepa.losses.prediction import prediction_loss

__all__ = ["prediction_loss"]
