"""sdmprune: structured MLP pruning of causal LMs guided by self-distillation."""

__version__ = "0.1.0"

from .errors import SdmpruneError  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .export import export_pruned, load_pruned, slice_model  # noqa: E402
from .masks import NeuronMasks, count_parameters  # noqa: E402
from .models import load_model  # noqa: E402
from .nuteprune import NutePruneConfig, NutePruneResult, nuteprune  # noqa: E402
from .pruning import PruneConfig, PruneResult, prune  # noqa: E402
from .recovery import FinetuneConfig, finetune  # noqa: E402

__all__ = [
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
