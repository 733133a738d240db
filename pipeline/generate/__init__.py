"""Stage `generate`: labelled synthetic images sampled from the diffusion model (DM-AT's data)."""
