"""Row order of a prepared split: telling a label-ordered source, and a stratified shuffled order.

Every later subset of a split is a prefix or a range (``--limit``, ``--real-limit``, evaluate's
``--offset``/``--n``, the probe's 80/20 split), so rows sorted by class would give those subsets a
few classes only. ``prepare`` refuses such a source unless ``--shuffle-seed`` asks for
``stratified_order``, in which every prefix holds each class in proportion to its frequency.

Label-ordered (``label_order``), precisely: let ``n`` rows carry labels with class counts ``n_k``,
at least two classes present, and ``c`` be the number of positions ``i`` with
``label[i] != label[i-1]``. Under a uniformly random order of the same labels the expected number
of changes is ``E = (n - 1) * (1 - sum_k n_k (n_k - 1) / (n (n - 1)))``. The rows are label-ordered
when ``E >= MIN_EXPECTED_CHANGES`` and ``c <= E / ORDERED_FRACTION``. A sorted set has ``c = K - 1``
(K classes), runs of B equal labels about ``n / B``; a random order's ``c`` is ``E`` give or take
about ``sqrt(E)``, so with ``E >= 16`` a shuffled set is called ordered only beyond 3 standard
deviations (in practice never: Fashion-MNIST's 60,000 train rows have about 54,000 changes). A
set with one class, or one too small to judge (``E < 16``, e.g. fewer than about 20 rows), is not
label-ordered.
"""

from __future__ import annotations

import heapq

import numpy as np

ORDERED_FRACTION = 4  # ordered: at most a quarter of the label changes a random order has
MIN_EXPECTED_CHANGES = 16.0  # below this a set is too small to tell ordered from shuffled


def label_changes(labels: np.ndarray) -> int:
    """How many consecutive rows differ in label."""
    labels = np.asarray(labels)
    return int(np.count_nonzero(labels[1:] != labels[:-1])) if len(labels) > 1 else 0


def expected_changes(labels: np.ndarray) -> float:
    """The expected number of label changes of a uniformly random order of these labels."""
    n = len(labels)
    if n < 2:
        return 0.0
    counts = np.unique(np.asarray(labels), return_counts=True)[1].astype(np.float64)
    return (n - 1) * (1.0 - float((counts * (counts - 1)).sum()) / (n * (n - 1)))


def label_order(labels: np.ndarray) -> dict:
    """``{"ordered", "label_changes", "expected_changes"}`` of a label sequence (see the module doc)."""
    c, e = label_changes(labels), expected_changes(labels)
    ordered = len(np.unique(np.asarray(labels))) > 1 and e >= MIN_EXPECTED_CHANGES and c * ORDERED_FRACTION <= e
    return {"ordered": bool(ordered), "label_changes": c, "expected_changes": round(e, 1)}


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the row indices: rows shuffled within each class with ``seed``, then the
    classes interleaved so that every prefix of length m holds floor(m p_k) or ceil(m p_k) rows of
    each class k (p_k its frequency): within one row of its share, and exactly k rows of each of K
    equal classes in every prefix of length kK.

    Each class's j-th row (0-based) may take a 1-based position m only where ceil(m p_k) >= j+1 and
    must take one where floor(m p_k) >= j+1; earliest deadline first fills the positions, which
    meets every deadline because such an order exists (the quota method of apportionment). Rows with
    equal deadlines are taken in a seeded random order, so no fixed class cycle appears.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    rows = [rng.permutation(np.flatnonzero(labels == k)) for k in classes]
    taken = [0] * len(classes)
    counts = [int(v) for v in counts]

    def release(k: int) -> int:  # first position the next row of class k may take
        return taken[k] * n // counts[k] + 1

    def deadline(k: int) -> int:  # last position it may take
        return -(-(taken[k] + 1) * n // counts[k])

    ties = rng.random(n)
    waiting = sorted((release(k), k) for k in range(len(classes)))  # (release, class), not yet ready
    ready: list[tuple[int, float, int]] = []  # (deadline, tie-break, class)
    order = np.empty(n, dtype=np.int64)
    for m in range(1, n + 1):
        while waiting and waiting[0][0] <= m:
            _, k = heapq.heappop(waiting)
            heapq.heappush(ready, (deadline(k), float(ties[rows[k][taken[k]]]), k))
        if not ready:
            raise RuntimeError(f"stratified_order: no class ready at position {m}")
        due, _, k = heapq.heappop(ready)
        if due < m:
            raise RuntimeError(f"stratified_order: class {classes[k]} missed position {due} (now {m})")
        order[m - 1] = rows[k][taken[k]]
        taken[k] += 1
        if taken[k] < counts[k]:
            heapq.heappush(waiting, (release(k), k))
    return order
