"""Stage `train`: adversarial training (PGD-AT / TRADES, DM-AT mixing, DRA) from the cache."""
