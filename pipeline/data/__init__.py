"""Stage `prepare`: readers of raw datasets (IDX, CIFAR pickles, image folders, npz) and their config."""
