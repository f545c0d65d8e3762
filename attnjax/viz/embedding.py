"""2-D embeddings of vectors for the Q/K map: PCA and t-SNE, in numpy (no new dependency).

- ``pca_2d``: the first two principal axes (a linear map: distances along them are
  the vectors' own, and the caption can give the variance they hold).
- ``tsne_2d``: t-SNE (van der Maaten & Hinton 2008, "Visualizing Data using t-SNE",
  JMLR 9), the exact-gradient version, which AttentionViz also offers: each point's
  neighbours are kept near it, at the cost of distances between clusters meaning
  little. Point i's affinities p_{j|i} are Gaussian in squared distance, with the
  bandwidth found by bisection so that their perplexity 2^H is ``perplexity``; P is
  symmetrised (p_ij = (p_{j|i} + p_{i|j}) / 2N) and matched by Student-t affinities
  q_ij ∝ (1 + |y_i - y_j|^2)^-1 in 2-D through gradient descent on KL(P || Q) with the
  paper's momentum, per-coordinate gains (Jacobs 1988) and early exaggeration. Seeded,
  so the same vectors give the same picture. Exact gradients cost O(N^2) a step: for
  the Q/K map's 2 x 256 points at most, about a second.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

TSNE_PERPLEXITY = 30.0        # effective neighbours per point (capped at (N - 1) / 3)
TSNE_ITERATIONS = 750
TSNE_EXAGGERATION = 12.0      # P is multiplied by this for the first EXAGGERATED_ITERATIONS steps
EXAGGERATED_ITERATIONS = 250
BISECTION_STEPS = 64          # per-point bandwidth search (in log space)
MIN_GAIN = 0.01


def pca_2d(points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 2) coordinates on the first two principal axes, and their variance shares (2,)."""
    centred = points - points.mean(axis=0, keepdims=True)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ axes[:2].T                                                      # (N, 2)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    share = singular ** 2 / max(float((singular ** 2).sum()), 1e-30)
    return coords, np.pad(share[:2], (0, max(0, 2 - len(share[:2]))))


def tsne_perplexity(count: int, perplexity: float = TSNE_PERPLEXITY) -> float:
    """The perplexity t-SNE uses for ``count`` points: at most (count - 1) / 3."""
    return float(min(perplexity, max((count - 1) / 3.0, 1.0)))


def tsne_2d(points: np.ndarray, *, perplexity: float = TSNE_PERPLEXITY, iterations: int = TSNE_ITERATIONS,
            seed: int = 0) -> np.ndarray:
    """(N, 2) t-SNE coordinates of (N, D) ``points`` (centred at 0); see the module docstring."""
    points = np.asarray(points, dtype=np.float64)
    count = len(points)
    if count < 3:
        return pca_2d(points)[0]
    joint = _joint_affinities(_squared_distances(points), tsne_perplexity(count, perplexity))   # (N, N)
    rate = max(count / TSNE_EXAGGERATION / 4.0, 50.0)   # the "auto" learning rate of Belkina et al. 2019
    rng = np.random.default_rng(seed)
    coords = rng.normal(0.0, 1e-4, (count, 2))                                          # (N, 2)
    velocity = np.zeros_like(coords)
    gains = np.ones_like(coords)
    for step in range(iterations):
        early = step < EXAGGERATED_ITERATIONS
        kernel = 1.0 / (1.0 + _squared_distances(coords))                                 # (N, N)
        np.fill_diagonal(kernel, 0.0)
        low = np.maximum(kernel / kernel.sum(), 1e-12)                                   # (N, N) q_ij
        attraction = ((TSNE_EXAGGERATION if early else 1.0) * joint - low) * kernel      # (N, N)
        gradient = 4.0 * (attraction.sum(axis=1, keepdims=True) * coords - attraction @ coords)  # (N, 2)
        same_sign = np.sign(gradient) == np.sign(velocity)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), MIN_GAIN)
        velocity = (0.5 if early else 0.8) * velocity - rate * gains * gradient
        coords = coords + velocity
        coords -= coords.mean(axis=0, keepdims=True)
    return coords


def _squared_distances(points: np.ndarray) -> np.ndarray:
    """(N, N) squared Euclidean distances (clipped at 0 against rounding)."""
    norms = np.sum(points ** 2, axis=1)                                                 # (N,)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * points @ points.T, 0.0)


def _joint_affinities(distances: np.ndarray, perplexity: float) -> np.ndarray:
    """Symmetric P (N, N), summing to 1: p_ij = (p_{j|i} + p_{i|j}) / 2N."""
    rows = _conditional_affinities(distances, perplexity)                               # (N, N) p_{j|i}
    return np.maximum((rows + rows.T) / (2.0 * len(distances)), 1e-12)


def _conditional_affinities(distances: np.ndarray, perplexity: float) -> np.ndarray:
    """p_{j|i} (N, N), rows summing to 1: each row's Gaussian bandwidth bisected (in log
    precision, all rows at once) until the row's entropy is log(perplexity) nats."""
    count = len(distances)
    target = np.log(perplexity)
    off_diagonal = ~np.eye(count, dtype=bool)
    # Distances relative to each row's nearest neighbour keep exp() in range.
    scaled = distances - np.where(off_diagonal, distances, np.inf).min(axis=1, keepdims=True)   # (N, N)
    low, high = np.full((count, 1), -30.0), np.full((count, 1), 30.0)                  # log precision bounds
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2.0
        rows = _gaussian_rows(scaled, np.exp(middle), off_diagonal)
        entropy = -np.sum(np.where(rows > 0, rows * np.log(np.where(rows > 0, rows, 1.0)), 0.0), axis=1,
                          keepdims=True)                                                 # (N, 1)
        too_flat = entropy > target           # too many neighbours: sharpen (raise the precision)
        low, high = np.where(too_flat, middle, low), np.where(too_flat, high, middle)
    return _gaussian_rows(scaled, np.exp((low + high) / 2.0), off_diagonal)


def _gaussian_rows(distances: np.ndarray, precision: np.ndarray, off_diagonal: np.ndarray) -> np.ndarray:
    weights = np.where(off_diagonal, np.exp(-distances * precision), 0.0)               # (N, N)
    return weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
