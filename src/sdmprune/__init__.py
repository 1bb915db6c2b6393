"""sdmprune: structured MLP pruning of causal LMs guided by self-distillation."""

from ._version import __version__
from .errors import SdmpruneError
from .evaluation import perplexity
from .export import export_pruned, slice_model
from .masks import NeuronMasks, count_parameters
from .models import load_model, load_pruned
from .nuteprune import NutePruneConfig, NutePruneResult, nuteprune
from .pruning import PruneConfig, PruneResult, prune
from .recovery import FinetuneConfig, finetune

__all__ = [
    "__version__",
    "FinetuneConfig",
    "NeuronMasks",
    "NutePruneConfig",
    "NutePruneResult",
    "PruneConfig",
    "PruneResult",
    "SdmpruneError",
    "count_parameters",
    "export_pruned",
    "finetune",
    "load_model",
    "load_pruned",
    "nuteprune",
    "perplexity",
    "prune",
    "slice_model",
]
