"""bitfit-peft: BitFit (bias-only fine-tuning) as a first-class Hugging Face PEFT method.

Importing this package registers the method with peft (peft_type ``"BITFIT"``), so `get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModel*` and transformers' `model.load_adapter` work with `BitFitConfig`.

The modules import one way, from the bottom up: `constants` <- `compact` <- `files` <- `card`, `fingerprint` (and
`layer_types`, `architectures`) <- `config`, `targets`, `routing` <- `layer` <- `router` <- `loading` <- `model` <-
`registration` <- this package (`heads` and `analysis` stand beside the core; `cli` and `serving` sit on top).
"""

from . import quiet  # noqa: F401  # first: filters the optional imports' noise before peft imports torchao
from .analysis import BiasChange, bias_changes, bias_changes_from_state_dicts, bias_deltas, change_matrix
from .architectures import classify_module
from .config import BitFitConfig
from .constants import BASE, BIAS_TERMS
from .files import check_adapter_file
from .heads import MeanPooledSequenceClassifier, MeanPoolingHead, uses_mean_pooling
from .layer import BitFitLayer
from .lean import disable_lean_training, enable_lean_training
from .loading import hotswap_adapter
from .model import BitFitModel
from .registration import BitFitPeftType, register

register()

__version__ = "0.1.0"
__all__ = [
    "BASE",
    "BIAS_TERMS",
    "BiasChange",
    "MeanPooledSequenceClassifier",
    "MeanPoolingHead",
    "bias_changes",
    "bias_changes_from_state_dicts",
    "bias_deltas",
    "change_matrix",
    "uses_mean_pooling",
    "BitFitConfig",
    "BitFitLayer",
    "BitFitModel",
    "BitFitPeftType",
    "check_adapter_file",
    "classify_module",
    "disable_lean_training",
    "enable_lean_training",
    "hotswap_adapter",
    "register",
]
