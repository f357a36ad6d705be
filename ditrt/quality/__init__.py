"""Image-quality evaluation without downloads: a digits classifier trained by ditrt, FD, class
accuracy, paired PSNR and per-timestep denoiser error."""
