"""Spatial Transformer layers (Jaderberg et al. 2015, "Spatial Transformer Networks", arXiv:1506.02025).

`AffineGridSample` is the sampler: ``AffineGridSample()(input, theta)`` computes
``F.grid_sample(input, F.affine_grid(theta, size), ...)`` through `fastcnn.ops.affine_grid_sample`,
which never materialises the N x H x W x 2 sampling grid. It has no parameters.

`SpatialTransformer` is the whole module of the paper's Figure 2: a localisation network (any
``nn.Module`` you give it) maps the input to features, a final fully connected regressor ``fc_loc``
turns them into the six numbers of an affine transform theta, initialised to the identity, and the
sampler warps the input through theta. Put it in front of a classifier and train end to end.

Coordinates follow ``F.affine_grid``: theta maps normalised *output* coordinates (x, y in [-1, 1],
x along the width) to normalised *input* coordinates, ``[x_in, y_in] = theta @ [x_out, y_out, 1]``.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["AffineGridSample", "SpatialTransformer"]

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")
IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _check_choice(owner: str, name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _output_size(owner: str, output_size) -> Optional[Tuple[int, int]]:
    if output_size is None:
        return None
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        output_size = (output_size, output_size)
    if (
        not isinstance(output_size, (tuple, list, torch.Size))
        or len(output_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in output_size)
    ):
        raise ValueError(
            f"{owner}: output_size must be None, a positive int or a pair (H, W) of positive ints, "
            f"got {output_size!r}"
        )
    return (output_size[0], output_size[1])


class AffineGridSample(nn.Module):
    r"""Samples ``input`` [N, C, H_in, W_in] at the affine grid of ``theta`` [N, 2, 3]: the Spatial
    Transformer's grid generator and sampler in one op, without the intermediate grid.

    ``AffineGridSample(output_size, mode, padding_mode, align_corners)(input, theta)`` equals
    ``F.grid_sample(input, F.affine_grid(theta, (N, C, H, W), align_corners), mode, padding_mode,
    align_corners)``, computed by `fastcnn.ops.affine_grid_sample` on the backend `fastcnn.backends`
    picks.

    Args:
        output_size: (H, W) of the output, or an int for a square output; ``None`` (default) keeps
            the input's H and W.
        mode: interpolation, ``'bilinear'`` (default, the paper's sampler) or ``'nearest'``, as in
            ``F.grid_sample`` (whose ``'bicubic'`` the fastcnn kernels do not implement).
        padding_mode: value of samples outside the input: ``'zeros'`` (default), ``'border'`` or
            ``'reflection'``, as in ``F.grid_sample``.
        align_corners: as in ``F.affine_grid`` and ``F.grid_sample``: whether -1 and 1 are the
            centres (True) or the outer edges (False, default) of the corner pixels.

    Example::

        >>> sampler = AffineGridSample(output_size=(16, 16))
        >>> theta = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])  # zoom 2x on the centre
        >>> sampler(torch.randn(1, 3, 32, 32), theta).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(
        self,
        output_size: Union[int, Sequence[int], None] = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.output_size = _output_size(owner, output_size)
        self.mode = _check_choice(owner, "mode", mode, MODES)
        self.padding_mode = _check_choice(owner, "padding_mode", padding_mode, PADDING_MODES)
        if not isinstance(align_corners, bool):
            raise TypeError(f"{owner}: align_corners must be a bool, got {align_corners!r}")
        self.align_corners = align_corners

    def forward(self, input: Tensor, theta: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape [N, C, H, W] (4-D), got a "
                f"{input.dim()}-D tensor of shape {tuple(input.shape)}"
            )
        n, c, h, w = input.shape
        if theta.dim() != 3 or theta.shape[0] != n or theta.shape[1:] != (2, 3):
            raise ValueError(
                f"{type(self).__name__}: expected theta of shape [N, 2, 3] with N = {n} (the input's "
                f"batch), got {tuple(theta.shape)}"
            )
        out_h, out_w = self.output_size if self.output_size is not None else (h, w)
        return ops.affine_grid_sample(
            input,
            theta,
            (n, c, out_h, out_w),
            mode=self.mode,
            padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
            f"align_corners={self.align_corners}"
        )


def _init_identity(fc: nn.Linear) -> None:
    """Zero weight and bias (1, 0, 0, 0, 1, 0): the regressor starts at the identity transform."""
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor(IDENTITY_THETA, dtype=fc.bias.dtype, device=fc.bias.device))


class _LazyAffineRegressor(nn.LazyLinear):
    """`nn.LazyLinear(6)` whose parameters, once materialised, hold the identity transform. After
    the first forward it becomes a plain `nn.Linear`, like every lazy layer."""

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.in_features != 0:
            _init_identity(self)


class SpatialTransformer(nn.Module):
    r"""A Spatial Transformer: ``x -> sampler(x, theta(x))``, with
    ``theta(x) = fc_loc(flatten(localization(x))).view(N, 2, 3)``.

    Submodules:
        ``localization``: the network you pass; it maps the input [N, C, H, W] to features of any
            shape [N, ...], flattened from dim 1 (end it with a ReLU: the regressor is linear).
        ``fc_loc``: the ``nn.Linear(localization_features, 6)`` regressor of theta, appended here
            and initialised to the identity transform (weight 0, bias [1, 0, 0, 0, 1, 0]), so that
            an untrained transformer passes its input through unchanged and training starts from
            the plain classifier.
        ``sampler``: an `AffineGridSample` with ``output_size``, ``mode``, ``padding_mode`` and
            ``align_corners``.

    Args:
        localization: the localisation network.
        localization_features: number of features ``localization`` produces per sample (after
            flattening). ``None`` (default) infers it on the first forward with ``nn.LazyLinear``;
            then run one batch (or ``torch.no_grad()`` dry run) before creating the optimiser, as for
            any lazy module. Give the number when you know it.
        output_size, mode, padding_mode, align_corners: as in `AffineGridSample`.

    ``forward(x)`` returns only the transformed input; ``theta(x)`` returns the [N, 2, 3] transform
    it uses (for visualisation, or for a regulariser on theta), and ``sampler(x, theta)`` applies a
    transform: ``stn(x)`` equals ``stn.sampler(x, stn.theta(x))``.

    Example::

        >>> loc = nn.Sequential(nn.Conv2d(1, 8, 7), nn.MaxPool2d(2), nn.ReLU(),
        ...                     nn.Conv2d(8, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(90, 32), nn.ReLU())
        >>> stn = SpatialTransformer(loc, localization_features=32)
        >>> x = torch.randn(4, 1, 28, 28)
        >>> torch.allclose(stn(x), x, atol=1e-5)  # identity at initialisation
        True
    """

    def __init__(
        self,
        localization: nn.Module,
        output_size: Union[int, Sequence[int], None] = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
        localization_features: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(localization, nn.Module):
            raise TypeError(f"SpatialTransformer: localization must be an nn.Module, got {type(localization).__name__}")
        self.localization = localization
        if localization_features is None:
            self.fc_loc = _LazyAffineRegressor(6)
        else:
            if (
                isinstance(localization_features, bool)
                or not isinstance(localization_features, int)
                or localization_features <= 0
            ):
                raise ValueError(
                    f"SpatialTransformer: localization_features must be a positive int or None, "
                    f"got {localization_features!r}"
                )
            self.fc_loc = nn.Linear(localization_features, 6)
            _init_identity(self.fc_loc)
        # Checked here too, so that errors name the class the user built.
        _output_size("SpatialTransformer", output_size)
        _check_choice("SpatialTransformer", "mode", mode, MODES)
        _check_choice("SpatialTransformer", "padding_mode", padding_mode, PADDING_MODES)
        self.sampler = AffineGridSample(output_size, mode, padding_mode, align_corners)

    def reset_regressor(self) -> None:
        """Put ``fc_loc`` back at the identity transform (weight 0, bias [1, 0, 0, 0, 1, 0])."""
        if isinstance(self.fc_loc, nn.LazyLinear) and self.fc_loc.has_uninitialized_params():
            return  # initialised to the identity when it materialises
        _init_identity(self.fc_loc)

    def theta(self, x: Tensor) -> Tensor:
        """The affine transform [N, 2, 3] the transformer applies to ``x``."""
        features = torch.flatten(self.localization(x), 1)
        return self.fc_loc(features).view(-1, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.sampler(x, self.theta(x))
