"""Transferability scores of frozen features for a labelled target set, in plain numpy (no TensorFlow).

    logme(features, labels)        LogME (You et al., ICML 2021): the mean over classes of the maximised log
                                   evidence per example of a Bayesian linear regression onto the one-hot label
    h_score(features, labels)      H-score (Bao et al. 2019): tr(cov(f)^-1 cov(E[f|y])), optionally with the
                                   covariance shrunk (Ledoit-Wolf), as Ibrahim et al. (2022) recommend when the
                                   feature dimension is not small against the sample
    probe_accuracy(...)            a ridge-regression linear probe fitted on one part, accuracy on another
    bn_gap(...)                    how far target statistics are from a BatchNormalization layer's moving ones
    kendall_tau(a, b)              Kendall's tau-b (ties allowed), for the calibration

LogME follows the fixed-point algorithm of the authors' reference implementation (thuml/LogME, `_fit_fixed_point`):
an SVD of the features once, then per class at most 11 updates of alpha (the weight prior's precision) and beta
(the noise precision) from alpha = beta = 1, stopping when alpha / beta moves by at most 0.1 %; features are used as
given (no centring or scaling), in float64. One difference: when the features have fewer
non-zero singular values k than dimensions D (always when N < D), the reference's evidence leaves out the
-(D - k)/2 log(alpha) of log det(alpha I + beta F^T F), which favours wide features; `logme` includes it (the
exact marginal likelihood, checked against a direct Gaussian density in the tests) and `logme(...,
as_reference=True)` reproduces the reference's number. For k = D the two agree.
"""

from __future__ import annotations

import numpy as np

from tfl.errors import UsageError

LOGME_ITERATIONS = 11  # the reference's cap: it converges in a few updates
LOGME_TOLERANCE = 1e-3  # relative change of alpha / beta that ends the updates
EPSILON = 1e-5  # the reference adds it to both denominators


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] < 2:
        raise UsageError(f"features must be [N, D] with N >= 2 matching labels [N]; got {f.shape} and {y.shape}")
    return f, y


def logme(features: np.ndarray, labels: np.ndarray, as_reference: bool = False) -> float:
    """LogME of `features` [N, D] for integer `labels` [N] in 0..C-1 (higher: the features explain the labels
    better with a linear model). Classes absent from `labels` below max(labels) count, as in the reference."""
    return float(np.mean(logme_per_class(features, labels, as_reference)[0]))


def logme_per_class(features: np.ndarray, labels: np.ndarray,
                    as_reference: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(evidence per example, alpha, beta), one of each per class."""
    f, y = _check(features, labels)
    n, d = f.shape
    u, s, _ = _thin_svd(f)
    sigma = s**2  # eigenvalues of F^T F (the non-zero ones)
    evidences, alphas, betas = [], [], []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(np.float64)
        x = u.T @ target  # the target in the features' left singular basis
        x2 = x**2
        outside = float(target @ target - x2.sum())  # the part of the target no feature direction reaches
        alpha, beta = 1.0, 1.0
        if not len(sigma):  # all-zero features explain nothing: the evidence of the noise model alone
            beta = n / (float(target @ target) + EPSILON)
            evidences.append(0.5 * np.log(beta) - beta * float(target @ target) / (2 * n) - 0.5 * np.log(2 * np.pi))
            alphas.append(np.inf)
            betas.append(beta)
            continue
        for _ in range(LOGME_ITERATIONS):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())  # effective number of well-determined weights
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())  # |m|^2, m the posterior mean of the weights
            res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + outside  # |y - F m|^2
            alpha = gamma / (m2 + EPSILON)
            beta = (n - gamma) / (res2 + EPSILON)
            if abs(alpha / beta - t) / t <= LOGME_TOLERANCE:
                break
        evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
                    - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
        if not as_reference:
            evidence -= (d - len(sigma)) / 2.0 * np.log(alpha)  # the zero singular values' share of log det
        evidences.append(evidence / n)
        alphas.append(alpha)
        betas.append(beta)
    return np.array(evidences), np.array(alphas), np.array(betas)


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """log p(target | F, alpha, beta) of y = F w + noise, w ~ N(0, I/alpha), noise ~ N(0, I/beta), per example,
    computed directly as a Gaussian log density (N x N): the quantity LogME maximises, for checking it."""
    f = np.asarray(features, np.float64)
    y = np.asarray(target, np.float64)
    n = f.shape[0]
    cov = np.eye(n) / beta + f @ f.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y)) / n)


def _thin_svd(f: np.ndarray):
    """U [N, k], s [k], Vh [k, D] for the k non-zero singular values. For N > D through the D x D Gram matrix
    (cheaper), as the reference does."""
    n, d = f.shape
    if n > d:
        _, s2, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(np.maximum(s2, 0.0))
        keep = s > 1e-10
        s, vh = s[keep], vh[keep]
        return (f @ vh.T) / s, s, vh
    u, s, vh = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10
    return u[:, keep], s[keep], vh[keep]


def h_score(features: np.ndarray, labels: np.ndarray, shrinkage: str | float | None = "ledoit_wolf") -> float:
    """tr(cov(f)^-1 cov(E[f | y])): the between-class share of the feature variance, summed over directions (at
    most C - 1). shrinkage: None uses the sample covariance (pseudo-inverse); a number a in [0, 1] shrinks it to
    (1 - a) cov + a (tr(cov) / D) I; "ledoit_wolf" chooses a from the data (Ledoit & Wolf 2004). With shrinkage
    and more dimensions than examples it is computed in the examples' span (N x N, Woodbury), same value."""
    f, y = _check(features, labels)
    n, d = f.shape
    centred = f - f.mean(axis=0)
    class_means = np.zeros_like(centred)
    for c in np.unique(y):
        members = y == c
        class_means[members] = centred[members].mean(axis=0)
    a = None
    if shrinkage is not None:
        a = ledoit_wolf_shrinkage(centred) if shrinkage == "ledoit_wolf" else float(shrinkage)
        if not 0.0 <= a <= 1.0:
            raise UsageError(f"shrinkage {shrinkage!r}: must be 'ledoit_wolf', None or a number in [0, 1]")
    if a is not None and a > 0 and d > n:
        gram = centred @ centred.T  # N x N
        b = a * np.trace(gram) / n / d  # the identity's weight, a tr(cov) / D
        if a >= 1.0:
            return float(np.sum(class_means**2) / n / b)
        # (b I + (1-a)/n X^T X)^-1 = (I - X^T K^-1 X) / b with K = n b / (1 - a) I + X X^T
        k = n * b / (1 - a) * np.eye(n) + gram
        mx = class_means @ centred.T  # M X^T, N x N
        return float((np.sum(class_means**2) - np.trace(mx @ np.linalg.solve(k, mx.T))) / (n * b))
    cov = centred.T @ centred / n
    if a is not None:
        cov = (1 - a) * cov + a * np.trace(cov) / d * np.eye(d)
    between = class_means.T @ class_means / n
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ between))


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """The Ledoit-Wolf shrinkage intensity towards a scaled identity for centred samples [N, D], from N x N
    products only (the D x D covariance is never formed)."""
    n, d = centred.shape
    gram = centred @ centred.T
    trace = np.trace(gram) / n  # tr(cov)
    mu = trace / d
    cov_sq = np.sum(gram**2) / n**2  # |cov|_F^2 = |X X^T|_F^2 / n^2
    delta = (cov_sq - 2 * mu * trace + mu**2 * d) / d  # |cov - mu I|_F^2 / d
    row_sq = np.sum(centred**2, axis=1)
    beta = (np.sum(row_sq**2) / n - cov_sq) / (d * n)  # the sample covariance's variance
    beta = min(beta, delta)
    return 0.0 if delta <= 0 else float(beta / delta)


def probe_accuracy(train_features, train_labels, test_features, test_labels, ridge: float = 1.0) -> float:
    """Accuracy on the test part of a linear classifier fitted on the train part: ridge regression onto the
    one-hot labels (features standardised with the train part's mean and sd, an intercept, penalty `ridge` per
    example), the class with the largest output wins. Closed form: no iterations, no randomness."""
    xf, yf = _check(train_features, train_labels)
    xt, yt = _check(test_features, test_labels)
    mean, sd = xf.mean(axis=0), xf.std(axis=0)
    sd[sd < 1e-8] = 1.0
    xf, xt = (xf - mean) / sd, (xt - mean) / sd
    classes = int(max(yf.max(), yt.max())) + 1
    target = np.eye(classes)[yf]
    target = target - target.mean(axis=0)
    lam = ridge * len(xf)
    if xf.shape[1] > xf.shape[0]:  # the dual: an N x N system instead of D x D
        weights = xf.T @ np.linalg.solve(xf @ xf.T + lam * np.eye(len(xf)), target)
    else:
        weights = np.linalg.solve(xf.T @ xf + lam * np.eye(xf.shape[1]), xf.T @ target)
    scores = xt @ weights + np.eye(classes)[yf].mean(axis=0)
    return float(np.mean(np.argmax(scores, axis=1) == yt))


def bn_gap(mean: np.ndarray, var: np.ndarray, moving_mean: np.ndarray, moving_var: np.ndarray,
           eps: float = 1e-3) -> float:
    """Mean over channels of KL(N(mean, var) || N(moving_mean, moving_var)): how far the target's statistics
    at a BatchNormalization layer's input are from those it was trained with (0: the same)."""
    var_t = np.asarray(var, np.float64) + eps
    var_s = np.asarray(moving_var, np.float64) + eps
    diff = np.asarray(mean, np.float64) - np.asarray(moving_mean, np.float64)
    return float(np.mean(0.5 * (np.log(var_s / var_t) + (var_t + diff**2) / var_s - 1.0)))


def kendall_tau(a, b) -> float:
    """Kendall's tau-b of two sequences (nan when either is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise UsageError(f"kendall_tau needs two 1-D sequences of one length, got {a.shape} and {b.shape}")
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    concordant = float(np.sum(da * db))
    ties_a, ties_b = np.sum(da != 0), np.sum(db != 0)
    if ties_a == 0 or ties_b == 0:
        return float("nan")
    return concordant / float(np.sqrt(ties_a * ties_b))
