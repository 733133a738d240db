"""How much information a target set holds, measured before anyone trains on it.

A DRA target that is nearly a scalar (one direction holding most of its variance, or little more
than the image's brightness) cannot teach a classifier much; a sweep over timesteps whose sets are
almost the same measures little. ``extract`` writes these figures for every target set into the
store's root attributes (``diagnostics``, under the digest), ``cache info`` and the sweep table show
them. All on the same rows of the train part (at most ``MAX_ROWS``, drawn with a fixed seed), on
view 0 of each row, with the pixels of exactly that view. Definitions:

- **effective rank** after centring: exp of the Shannon entropy of the normalised eigenvalues of the
  covariance (Roy & Vetterli 2007), between 1 (one direction) and the dimension (isotropic); with
  ``top_share`` (the largest eigenvalue's share of the variance) and ``dims_90``/``dims_99`` (the
  fewest directions holding 90% / 99% of it).
- **brightness R^2**: the share of the target's total variance that a least-squares affine map of
  the view's mean pixel value explains, ``1 - SS_res / SS_tot`` summed over dimensions.
- **pixels R^2**: the same for a ridge regression on all pixels (standardised, weight ``RIDGE`` x
  the number of pixels), fitted on the first ``FIT_SHARE`` of the rows and scored on the others,
  so that it cannot overfit when there are more pixels than rows.
- **similarity** of two sets: linear CKA (Kornblith et al. 2019; 1 for sets equal up to a rotation
  and scale, ~0 for independent ones; any two dimensions) and, for sets of equal dimension, the
  centred cosine: the cosine between the two centred (N, D) matrices taken as vectors.

A grid target (C, G, G) (extract --pooling grid4/grid7) counts as one vector of its C*G*G numbers
(every location's channels, flattened; not the mean over locations), so its effective rank and
similarity see the spatial layout too. The similarity never forms a matrix of more than N x N
entries (N <= ``MAX_ROWS``), so wide grid targets stay within bounded memory. Rows where any
set holds NaN/Inf are left out of every figure (``rows`` is the number used, ``non_finite_rows``
how many were left out, when any were); ``cache verify`` reports such values.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MAX_ROWS = 2000
FIT_SHARE = 0.8
RIDGE = 1.0


def _centred(x: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N, D) float64 with every column's mean taken off; at least 2 finite rows."""
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or len(x) < 2 or x[0].size < 1:
        raise ValueError(f"a target set needs at least 2 rows of at least 1 value, not shape {x.shape}")
    x = x.reshape(len(x), -1)
    if not np.isfinite(x).all():
        raise ValueError("a target set holds NaN/Inf values: its diagnostics are undefined")
    return x - x.mean(axis=0)


def _same_rows(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"two sets of {len(a)} and {len(b)} rows: similarity needs the same rows")


def spectrum(x: np.ndarray) -> dict:
    """Effective rank, top direction's share, directions for 90% and 99% of the variance."""
    xc = _centred(x)
    s = np.linalg.svd(xc, compute_uv=False) ** 2  # eigenvalues of the covariance, up to 1/N
    total = s.sum()
    if total <= 0:
        return {"effective_rank": 0.0, "top_share": 0.0, "dims_90": 0, "dims_99": 0}
    p = s / total
    nz = p[p > 0]
    cum = np.cumsum(p)
    return {"effective_rank": float(np.exp(-(nz * np.log(nz)).sum())), "top_share": float(p[0]),
            "dims_90": int(np.searchsorted(cum, 0.9 - 1e-12) + 1), "dims_99": int(np.searchsorted(cum, 0.99 - 1e-12) + 1)}


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot, summed over the columns of ``y`` (its total variance explained)."""
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    tot = ((y - y.mean(axis=0)) ** 2).sum()
    return float(1 - ((y - pred.reshape(y.shape)) ** 2).sum() / tot) if tot > 0 else 0.0


def brightness_r2(y: np.ndarray, brightness: np.ndarray) -> float:
    """Share of the target's variance an affine map of the mean pixel value explains (in-sample)."""
    a = np.stack([np.asarray(brightness, np.float64), np.ones(len(brightness))], axis=1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    _same_rows(y, a)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return r2(y, a @ coef)


def pixels_r2(y: np.ndarray, pixels: np.ndarray) -> float:
    """Held-out share of the target's variance a ridge regression on the pixels explains."""
    x = np.asarray(pixels, np.float64).reshape(len(pixels), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    _same_rows(y, x)
    n_fit = int(len(x) * FIT_SHARE)
    if n_fit < 1 or n_fit == len(x):
        raise ValueError(f"{len(x)} row(s): the pixels R^2 needs rows to fit and rows held out")
    mu, sd = x[:n_fit].mean(axis=0), x[:n_fit].std(axis=0) + 1e-8
    xs = (x - mu) / sd
    y_mu = y[:n_fit].mean(axis=0)
    xf = xs[:n_fit]
    # ridge in its dual form (rows <= pixels here) or primal, whichever matrix is smaller
    lam = RIDGE * x.shape[1]
    if n_fit <= x.shape[1]:
        alpha = np.linalg.solve(xf @ xf.T + lam * np.eye(n_fit), y[:n_fit] - y_mu)
        pred = xs[n_fit:] @ (xf.T @ alpha) + y_mu
    else:
        w = np.linalg.solve(xf.T @ xf + lam * np.eye(x.shape[1]), xf.T @ (y[:n_fit] - y_mu))
        pred = xs[n_fit:] @ w + y_mu
    return r2(y[n_fit:], pred)


def _gram_norm(xc: np.ndarray) -> float:
    """||X'X||_F, through whichever of X'X (D x D) and XX' (N x N) is smaller: the two are equal."""
    return float(np.linalg.norm(xc.T @ xc if xc.shape[1] <= len(xc) else xc @ xc.T))


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA of two representations of the same rows: ||A'B||_F^2 / (||A'A||_F ||B'B||_F),
    A and B centred. Where the sets are wider than there are rows (a grid target), the numerator is
    computed as <AA', BB'>_F, which is equal, so that no matrix is ever larger than N x N."""
    ac, bc = _centred(a), _centred(b)
    _same_rows(ac, bc)
    if ac.shape[1] * bc.shape[1] <= len(ac) ** 2:
        num = float(np.linalg.norm(ac.T @ bc) ** 2)
    else:
        num = float(((ac @ ac.T) * (bc @ bc.T)).sum())
    den = _gram_norm(ac) * _gram_norm(bc)
    return num / den if den > 0 else 0.0


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine between the centred matrices of two sets of equal dimension, taken as vectors."""
    ac, bc = _centred(a), _centred(b)
    _same_rows(ac, bc)
    if ac.shape != bc.shape:
        raise ValueError(f"centred cosine needs sets of one dimension, not {ac.shape[1]} and {bc.shape[1]}")
    den = np.linalg.norm(ac) * np.linalg.norm(bc)
    return float((ac * bc).sum() / den) if den > 0 else 0.0


def diagnose(sets: Mapping[str, np.ndarray], views: np.ndarray) -> dict:
    """Every set's figures and every pair's similarity, on the same rows. ``views``: (N, H, W, C)
    pixels (uint8 or [0, 1]) of exactly the view each row's targets were computed from."""
    pixels = np.asarray(views, np.float64).reshape(len(views), -1)
    pixels = pixels / 255.0 if np.asarray(views).dtype == np.uint8 else pixels
    if not sets:
        raise ValueError("no target set to diagnose")
    finite = np.ones(len(pixels), bool)
    for name, y in sets.items():
        if len(y) != len(pixels):
            raise ValueError(f"target set {name!r} has {len(y)} rows for {len(pixels)} views")
        finite &= np.isfinite(np.asarray(y).reshape(len(y), -1)).all(axis=1)
    if not finite.all():
        sets = {name: np.asarray(y)[finite] for name, y in sets.items()}
        pixels = pixels[finite]
    brightness = pixels.mean(axis=1)
    out: dict = {"rows": int(len(pixels)), "sets": {}, "similarity": []}
    if not finite.all():
        out["non_finite_rows"] = int((~finite).sum())
    for name, y in sets.items():
        out["sets"][name] = {**{k: round(v, 6) if isinstance(v, float) else v for k, v in spectrum(y).items()},
                             "brightness_r2": round(brightness_r2(y, brightness), 6),
                             "pixels_r2": round(pixels_r2(y, pixels), 6)}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ya, yb = (np.asarray(sets[n]).reshape(len(pixels), -1) for n in (a, b))
            pair = {"a": a, "b": b, "cka": round(linear_cka(ya, yb), 6)}
            if ya.shape[1] == yb.shape[1]:
                pair["centred_cosine"] = round(centred_cosine(ya, yb), 6)
            out["similarity"].append(pair)
    return out


def _closest(pairs: object) -> dict[str, tuple[float, str]]:
    """Each set's most similar other set by linear CKA: (cka, name); malformed pairs left out."""
    out: dict[str, tuple[float, str]] = {}
    for p in pairs if isinstance(pairs, list) else []:
        if isinstance(p, dict) and isinstance(p.get("cka"), (int, float)) and isinstance(p.get("a"), str) \
                and isinstance(p.get("b"), str):
            for me, other in ((p["a"], p["b"]), (p["b"], p["a"])):
                if me not in out or p["cka"] > out[me][0]:
                    out[me] = (float(p["cka"]), other)
    return out


def diagnosis_lines(diag: dict | None) -> list[str]:
    """One line per target set (for extract's output and ``cache info``), with the other set it is
    most similar to (linear CKA) where the store holds several: near 1, the two measure one thing."""
    if isinstance(diag, dict) and isinstance(diag.get("error"), str):
        reason = "".join(c if c.isprintable() else "?" for c in diag["error"][:200])  # a store's text
        return [f"target diagnostics: not computed ({reason})"]
    if not isinstance(diag, dict) or not isinstance(diag.get("sets"), dict):
        return []
    lines, closest = [], _closest(diag.get("similarity"))
    for name, d in diag["sets"].items():
        try:
            near = f", closest {closest[name][1]} (CKA {closest[name][0]:.2f})" if name in closest else ""
            lines.append(f"  {name}: effective rank {d['effective_rank']:.1f} (top direction "
                         f"{100 * d['top_share']:.0f}%, 90% in {d['dims_90']}), brightness R^2 "
                         f"{d['brightness_r2']:.2f}, pixels R^2 {d['pixels_r2']:.2f}{near}")
        except (KeyError, TypeError, ValueError):  # a malformed record (a store from elsewhere): not shown
            lines.append(f"  {str(name)[:60]}: (malformed record)")
    return [f"target diagnostics ({diag.get('rows')} train rows, view 0):", *lines]
