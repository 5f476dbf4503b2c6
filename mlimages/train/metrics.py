"""Validation metrics in NumPy: per-rank sums that are all-reduced, so the totals are exact over
ranks; mAP is the per-rank mAP averaged over ranks, weighted by their image counts."""
import numpy as np


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (ties broken by order)."""
    if not positives.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """mAP over the classes with at least one positive (label >= threshold); masked (-1) rows
    of a class are left out of that class's ranking. NaN when no class has a positive."""
    aps = []
    for c in np.flatnonzero((labels >= threshold).any(axis=0)):
        keep = labels[:, c] != -1
        aps.append(average_precision(scores[keep, c], labels[keep, c] >= threshold))
    return float(np.mean(aps)) if aps else float("nan")


def multilabel_counts(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """[true positives, false positives, false negatives] at ``threshold`` (masked entries out)."""
    keep = labels != -1
    predicted = (probs >= threshold) & keep
    actual = (labels >= threshold) & keep
    return np.array([(predicted & actual).sum(), (predicted & ~actual).sum(),
                     (~predicted & actual).sum()], np.float64)


def precision_recall_f1(tp: float, fp: float, fn: float) -> tuple:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Rows whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())
