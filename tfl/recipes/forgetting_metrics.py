"""Continual-learning metrics: small pure functions of an accuracy matrix (numpy only, no TensorFlow).

R is T x T (T tasks; a list of rows may be given): R[i][j] = accuracy on task j's test data after training task
i (0-based here; the formulas below use the same indices, the last row is T-1). Rows may be shorter than T only
for a run that has not finished; every function here takes the full square matrix. Entries above the diagonal
(tasks not yet trained) never enter these metrics.

Which definition each follows (Avalanche: avalanche/evaluation/metrics/forgetting_bwt.py; Mammoth:
utils/metrics.py):
  acc                   mean_j R[T-1][j]. Both libraries agree.
  average_incremental   mean_i (mean_{j<=i} R[i][j])  (Rebuffi et al. 2017, iCaRL, with task-averaged rather than
                        example-averaged accuracy: the same when tasks have equal test sets, as in Split-Fashion-MNIST).
  bwt                   mean_{j<T-1} (R[T-1][j] - R[j][j])  (Lopez-Paz & Ranzato 2017). Mammoth's backward_transfer
                        is exactly this; Avalanche's BWT is minus its forgetting, i.e. the same number.
  forgetting            mean_{j<T-1} f_j with f_j = max_{j<=t<T-1} R[t][j] - R[T-1][j]  (Chaudhry et al. 2018).
                        Not Avalanche's "forgetting" (R[j][j] - R[T-1][j] = -BWT per task, the accuracy right after
                        training j rather than the best one). Mammoth's forgetting takes the max over every row
                        including the last, so it equals max(f_j, 0): the two agree unless the last task raised an
                        old task above its earlier best, where ours is negative and Mammoth's 0.
  per_task_forgetting   [f_0, ..., f_{T-2}] as above.
  min_old_accuracy      min_{0<=j<i<T} R[i][j]: the worst accuracy any already-trained task had after a later task
                        (a per-task version of De Lange et al. 2023's min-ACC, which they evaluate every iteration).
With one task (T = 1) nothing is ever old: bwt, forgetting and min_old_accuracy are None.
"""

from __future__ import annotations

import numpy as np

from tfl.errors import UsageError


def as_matrix(R) -> np.ndarray:
    """R as a float64 square array; ValueError for anything else."""
    matrix = np.asarray(R, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise UsageError(f"an accuracy matrix must be square, T x T with T >= 1; got shape {matrix.shape}")
    return matrix


def acc(R) -> float:
    """Average accuracy over all tasks after the last task: mean_j R[T-1][j]."""
    return float(as_matrix(R)[-1].mean())


def average_incremental(R) -> float:
    """mean_i A_i with A_i = mean_{j<=i} R[i][j]: the average accuracy on the tasks seen so far, after every task."""
    matrix = as_matrix(R)
    return float(np.mean([matrix[i, : i + 1].mean() for i in range(len(matrix))]))


def bwt(R) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting."""
    matrix = as_matrix(R)
    T = len(matrix)
    if T < 2:
        return None
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(T - 1)]))


def per_task_forgetting(R) -> list[float]:
    """f_j = max_{j<=t<T-1} R[t][j] - R[T-1][j] for every j < T-1 (Chaudhry et al. 2018)."""
    matrix = as_matrix(R)
    T = len(matrix)
    return [float(matrix[j: T - 1, j].max() - matrix[-1, j]) for j in range(T - 1)]


def forgetting(R) -> float | None:
    """Average forgetting (Chaudhry et al. 2018): mean_{j<T-1} f_j, see per_task_forgetting."""
    values = per_task_forgetting(R)
    return float(np.mean(values)) if values else None


def min_old_accuracy(R) -> float | None:
    """min_{0<=j<i<T} R[i][j]: the lowest accuracy of a task already trained, after any later task."""
    matrix = as_matrix(R)
    T = len(matrix)
    old = [matrix[i, j] for i in range(1, T) for j in range(i)]
    return float(min(old)) if old else None


def summary(R) -> dict:
    """Every metric of R, rounded to 6 digits (None where undefined)."""
    def rounded(value):
        return None if value is None else round(value, 6)

    return {"acc": rounded(acc(R)), "average_incremental_accuracy": rounded(average_incremental(R)),
            "bwt": rounded(bwt(R)), "forgetting": rounded(forgetting(R)),
            "per_task_forgetting": [round(v, 6) for v in per_task_forgetting(R)],
            "min_old_accuracy": rounded(min_old_accuracy(R))}
