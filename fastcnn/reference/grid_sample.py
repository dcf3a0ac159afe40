"""The Spatial Transformer sampler as stock PyTorch computes it (Jaderberg et al. 2015):
F.affine_grid materialises the N x H x W x 2 sampling grid, F.grid_sample reads it back."""
import torch.nn.functional as F


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def affine_grid_sample(input, theta, size, mode="bilinear", padding_mode="zeros", align_corners=False):
    """`size` is the output size (N, C, H, W), as F.affine_grid takes it."""
    grid = F.affine_grid(theta, list(size), align_corners=align_corners)
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
