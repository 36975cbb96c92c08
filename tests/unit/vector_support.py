"""Vectors and docs for the vector store tests, and the exact search they are checked against."""

import numpy as np

from cliptuner.index.embedded import StoredDoc


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_vectors(n: int, seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def text_docs(n: int, prefix: str = "d") -> list[StoredDoc]:
    return [StoredDoc(id=f"{prefix}{i}", text=f"text {i}") for i in range(n)]


def brute(matrix: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """The exact top-``k`` by cosine, best first (numpy); ties by position."""
    scores = unit(queries) @ unit(matrix).T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(ids[i], float(row[i])) for i in order])
    return out
