"""Learning and using a library on real data: data, collation, training on transformers' Trainer, evaluation,
routing diagnostics and the library directory."""

from .collate import IGNORE_INDEX, ChatCollator
from .data import ChatExample, DataError, load_examples
from .diagnostics import RoutingShares, own_expert_share, plot_routing, routing_shares
from .evaluation import answer_accuracy, answer_nll, choice_accuracy, option_scores
from .library import ExpertLibrary, LibraryError
from .prototypes import compute_prototype
from .training import LearnReport, StageReport, learn_task, new_expert_config, train_expert, train_router

__all__ = [
    "IGNORE_INDEX",
    "ChatCollator",
    "ChatExample",
    "DataError",
    "ExpertLibrary",
    "LearnReport",
    "LibraryError",
    "RoutingShares",
    "StageReport",
    "answer_accuracy",
    "answer_nll",
    "choice_accuracy",
    "compute_prototype",
    "learn_task",
    "load_examples",
    "new_expert_config",
    "option_scores",
    "own_expert_share",
    "plot_routing",
    "routing_shares",
    "train_expert",
    "train_router",
]
