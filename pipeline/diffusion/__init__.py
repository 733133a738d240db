"""Stage `diffusion`: the DDPM (load or train) whose representations the cache holds."""
