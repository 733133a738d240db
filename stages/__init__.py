"""One module per DVC stage: the recipe of that stage, composed from ``pipeline``."""
