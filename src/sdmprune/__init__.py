"""sdmprune: structured pruning of causal LMs guided by self-distillation.

The Python API is the recipes (`sdmprune.recipes`: prune, nuteprune, finetune, evaluate — each
`run(Config.of(**options))`, the same path as the command line) and the stages they compose.
"""

from ._version import __version__
from .errors import SdmpruneError
from .evaluation import perplexity
from .export import export_pruned, slice_model
from .masks import NeuronMasks, count_parameters
from .models import load_model, load_pruned
from .nuteprune import NutePruneConfig, NutePruneResult, nuteprune
from .pruning import PruneConfig, PruneResult, prune
from .recipes.finetune import finetune
from .recovery import FinetuneConfig

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
