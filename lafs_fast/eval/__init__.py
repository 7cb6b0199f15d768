"""Evaluation: verification metrics (10-fold accuracy, AUC, TAR@FAR), .bin and IJB protocols."""
from .bin_reader import load_bin, write_bin  # noqa: F401
from .ijb import ijb_evaluation, template_features, template_pair_scores  # noqa: F401
from .verification import (  # noqa: F401
    best_threshold,
    cosine_scores,
    embed_with_flip,
    evaluate_pairs,
    format_table,
    kfold_accuracy,
    pair_scores,
    print_table,
    roc_auc,
    tar_at_far,
    verification_report,
)
