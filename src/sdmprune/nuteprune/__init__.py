"""NutePrune: hard-concrete masks over attention groups and MLP neurons, learned with LoRA and numerous
teachers drawn from the same model (gates.py, lagrangian.py, teachers.py, trainer.py)."""

from .trainer import NutePruneConfig, NutePruneResult, nuteprune, plot_trajectory, write_training_outputs

__all__ = ["NutePruneConfig", "NutePruneResult", "nuteprune", "plot_trajectory", "write_training_outputs"]
