"""Evaluation: metrics for generated text and classifiers, and statistics for comparing models.

- generation: BLEU and chrF/chrF++ (as sacrebleu), ROUGE-N/L/Lsum (as rouge-score, or Unicode-aware),
  SQuAD exact match and token F1.
- classification: confusion matrix, precision/recall/F1 with averages, accuracy, MCC, ROC and PR curves,
  ROC AUC and average precision (as scikit-learn), a classification report.
- stats: paired bootstrap, McNemar's test, the two-proportion z-test and A/B sample sizes.
- perplexity (import llmlab.eval.perplexity; it needs torch): perplexity and bits per byte with Hugging Face's
  sliding-window protocol.
- tasks and multiple_choice (import them by name): multiple-choice tasks (the BIG-bench files, JSONL, a subset
  of lm-eval's YAML) scored exactly as lm-evaluation-harness scores them (acc, acc_norm, acc_bytes).

Reference libraries (sacrebleu, rouge-score, scikit-learn, scipy) are test oracles only; nothing here
imports them.
"""

from .classification import (
    PRF, accuracy, auc, average_precision, classification_report, confusion_matrix, matthews_corrcoef,
    pr_curve, precision_recall_f1, roc_auc, roc_curve,
)
from .generation import (
    BLEUScore, CHRFScore, RougeScore, bleu, chrf, exact_match, normalize_answer, qa_f1, rouge,
    rouge_tokenize, sentence_bleu, squad, tokenize_bleu,
)
from .stats import (
    BootstrapResult, McNemarResult, ProportionTestResult, mcnemar, paired_bootstrap, sample_size_per_arm,
    two_proportion_test,
)

__all__ = [
    # generation
    "BLEUScore", "CHRFScore", "RougeScore", "bleu", "sentence_bleu", "chrf", "tokenize_bleu", "rouge",
    "rouge_tokenize", "exact_match", "qa_f1", "squad", "normalize_answer",
    # classification
    "PRF", "confusion_matrix", "accuracy", "precision_recall_f1", "matthews_corrcoef", "roc_curve",
    "pr_curve", "average_precision", "roc_auc", "auc", "classification_report",
    # stats
    "BootstrapResult", "McNemarResult", "ProportionTestResult", "paired_bootstrap", "mcnemar",
    "two_proportion_test", "sample_size_per_arm",
]
