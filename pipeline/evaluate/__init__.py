"""Stage `evaluate`: clean, PGD and AutoAttack accuracy of a trained classifier."""
