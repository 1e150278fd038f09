"""Diffusion (ADM/DiT Gaussian) and flow-matching (SiT) objectives and samplers."""
