"""Make tests/fixtures/logme_reference.json: LogME scores of the authors' reference algorithm on fixed inputs.

`reference_logme` below transcribes `LogME._fit_fixed_point` of thuml/LogME (LogME.py, the default `_fit`) line
by line, without numba (which only compiles the same numpy code): truncated SVD through F^T F when N > D, the
fixed-point updates of alpha and beta from 1, 1 (at most 11, stopping at a relative change of alpha / beta of
1e-3), the evidence per example averaged over classes. tfl.recipes.transferability.logme is tfl's own code;
tests/test_advise.py checks it against these numbers.

    python scripts/make_logme_fixture.py
"""

from __future__ import annotations

import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "logme_reference.json")
# (name, N, D, classes, seed): N > D (the Gram-matrix SVD branch) and N < D (the direct SVD branch)
CASES = [("tall", 60, 8, 3, 0), ("wide", 24, 40, 4, 1), ("separable", 50, 5, 2, 2)]


def reference_truncated_svd(x):
    u, s, vh = np.linalg.svd(x.transpose() @ x)
    s = np.sqrt(s)
    u_times_sigma = x @ vh.transpose()
    k = np.sum((s > 1e-10) * 1)
    s = s.reshape(-1, 1)
    s = s[:k]
    vh = vh[:k]
    u = u_times_sigma[:, :k] / s.reshape(1, -1)
    return u, s, vh


def reference_logme(f, y):
    f = f.astype(np.float64)
    N, D = f.shape
    if N > D:
        u, s, vh = reference_truncated_svd(f)
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = s ** 2
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64).reshape(-1, 1)
        x = u.T @ y_
        x2 = x ** 2
        res_x2 = (y_ ** 2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (N - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = D / 2.0 * np.log(alpha) + N / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma)) \
            - beta / 2.0 * res2 - alpha / 2.0 * m2 - N / 2.0 * np.log(2 * np.pi)
        evidences.append(evidence / N)
    return float(np.mean(evidences)), [float(e) for e in evidences]


def inputs(n, d, classes, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    features = rng.normal(size=(n, d)) + 0.8 * rng.normal(size=(classes, d))[labels]
    return np.round(features, 6), labels


def main():
    cases = []
    for name, n, d, classes, seed in CASES:
        features, labels = inputs(n, d, classes, seed)
        score, per_class = reference_logme(features, labels)
        cases.append({"name": name, "features": features.tolist(), "labels": labels.tolist(), "logme": score,
                      "per_class": per_class})
    with open(OUT, "w") as f:
        json.dump({"source": "thuml/LogME LogME._fit_fixed_point, transcribed in scripts/make_logme_fixture.py",
                   "cases": cases}, f)
    for case in cases:
        print(case["name"], case["logme"])


if __name__ == "__main__":
    main()
