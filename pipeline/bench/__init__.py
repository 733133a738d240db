"""`python -m pipeline bench`: what the cache saves, measured as ratios in one run."""
