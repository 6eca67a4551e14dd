import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from raysemi.ml.knn import knn_accuracy, knn_predict


def test_majority_vote_matches_sklearn():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(200, 16)).astype(np.float32)
    labels = rng.integers(0, 4, size=200)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    ours = knn_predict(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries), 4, k=1,
                       temperature=None)
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(bank, labels)
    np.testing.assert_array_equal(ours.numpy(), ref.predict(queries))


def test_separable_clusters_are_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 8) * 5
    y = torch.arange(3).repeat_interleave(30)
    x = centers[y] + 0.3 * torch.randn(90, 8, generator=g)
    yq = torch.arange(3).repeat_interleave(10)
    xq = centers[yq] + 0.3 * torch.randn(30, 8, generator=g)
    assert knn_accuracy(x, y, xq, yq, 3, k=5) == 1.0
    # Random labels on the bank: accuracy falls towards chance.
    y_rand = y[torch.randperm(90, generator=g)]
    assert knn_accuracy(x, y_rand, xq, yq, 3, k=5) < 0.7
