"""Triton kernels of the Spatial Transformer sampler (Jaderberg et al. 2015), 2-D.

Reference ops: ``F.grid_sample(input, grid, mode, padding_mode, align_corners)`` and, for theta,
``F.grid_sample(input, F.affine_grid(theta, size, align_corners), ...)``. The coordinate
arithmetic mirrors csrc/common/grid_sample_coords.h line by line (affine base coordinate as
torch.linspace computes it, unnormalize, clip, reflect with the float parity of the folds,
safe_coordinate sending NaN/Inf/out-of-int32 coordinates to -100 so that they sample as zero
padding, bilinear weights nw = (x1 - x)(y1 - y), nearest = round half to even, bilinear
coordinate gradient). Divisions use round-to-nearest (``tl.math.div_rn`` in fp32): Triton's
``/`` on fp32 is an approximate division on GPUs.

Launchers (registered by ``fastcnn.ops.grid_sample`` as ``torch.library.triton_op``s):

    forward(input, grid, theta, out_hw, interpolation, padding_mode, align_corners) -> output
    backward(grad_output, input, grid, theta, interpolation, padding_mode, align_corners,
             output_mask, deterministic) -> (grad_input, grad_grid_or_theta)

Exactly one of grid [N, Ho, Wo, 2] and theta [N, 2, 3] is a tensor. interpolation: 0 bilinear,
1 nearest; padding_mode: 0 zeros, 1 border, 2 reflection (PyTorch's codes). The output and
grad_input follow ``input.suggest_memory_format()`` (NCHW or channels_last); every tensor is read
through its strides (views, expanded zero-stride gradients), so nothing is copied. Arithmetic is
in fp32 (fp64 for fp64 tensors), cast once on store. The launchers only allocate tensors, call
traceable torch ops and launch kernels, so torch.compile can trace them.

Backward. One program per (image, tile of output pixels) computes the tile's source
coordinates once and loops over the channels:

- grad_grid / grad_theta: the sum over channels of grad_output * d(sample)/d(x, y), times the
  coordinate scale, is a per-pixel reduction in registers (deterministic by construction).
  grad_grid is stored directly; grad_theta = sum over pixels of grad_(x|y) * [bx, by, 1] is
  reduced per program into a partial-sum buffer [N, tiles, 6], then summed over the tile axis by
  torch.sum (fixed order): no atomics, deterministic in both modes.
- grad_input is a scatter (each sample adds w * grad_output to up to 4 input taps).
  Default: ``tl.atomic_add`` into a zero-filled fp32 (fp64) buffer in the input's memory format,
  cast to the input dtype at the end when that differs. For atomic-only work the channels are
  also split across programs, since no per-pixel sum over channels is needed.
- deterministic=True (``torch.use_deterministic_algorithms``): no float atomics. The coordinate
  kernel writes, for every entry e = (n, output pixel, tap), a key (n*(H*W + 1) + iy*W + ix, or
  the image's sentinel n*(H*W + 1) + H*W when the tap is outside the input) and the tap's bilinear
  weight. ``torch.sort(keys, stable=True)`` groups the entries by input pixel, keeping entry order
  within a group; ``torch.searchsorted`` of every key in the sorted keys gives each input pixel's
  range of entries (CSR). Past torch.sort's 2^31 - 1 elements both run a range of whole images
  at a time (each image's keys lie above the previous image's). A gather kernel then gives every
  input pixel (x a block of channels) the sum of weight * grad_output over its range in sorted
  order and writes grad_input once (zero for pixels that no sample reads): fixed order, bitwise
  reproducible, and no zero-fill pass. Cost: a sort of TAPS*N*Ho*Wo int32 keys (int64 past 2^31
  keys), about 20 bytes of temporaries per entry, and the gather's inner loop runs as long as the
  longest range in its block (balanced for the smooth warps of an STN; an extreme zoom that sends
  every sample to one pixel serialises on that pixel).
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv as _cdiv, grid as _launch_grid, memory_format as _output_format, on_tensor_device

# Test seam: the interpreted tests replace this with a NaN-filling allocator so that an element a
# kernel forgets to write fails the comparison instead of passing by luck. Buffers that must start
# at zero (the atomic grad_input accumulator) use torch.zeros directly.
_empty = torch.empty

# Elements of one program's [pixels x channels] tile (as in kernels/depthwise_conv2d.py).
_TILE = 1024

# torch.sort takes at most this many elements on CUDA (pytorch/pytorch#197470): the deterministic
# backward sorts its (sample, tap) entries image range by image range below it. A test seam too.
_MAX_SORT_ENTRIES = 2**31 - 1

# ----------------------------------------------------------------------------------------------
# Coordinate arithmetic: csrc/common/grid_sample_coords.h, one function each.


@triton.jit
def _acc(v, ACC_F64: tl.constexpr):
    if ACC_F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _div(a, b, ACC_F64: tl.constexpr):
    # Correctly rounded division (Triton's fp32 `/` is approximate on GPUs).
    if ACC_F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _affine_base_coord(i, size, ALIGN: tl.constexpr, ACC_F64: tl.constexpr):
    # torch.linspace(-1, 1, size)[i], scaled by (size - 1) / size without align_corners; the
    # first half counts up from -1, the second half down from +1, as linspace does. size is an
    # int32 scalar tensor, i an int32 vector.
    fi = _acc(i, ACC_F64)
    size_m1 = tl.maximum(size - 1, 1)  # size <= 1 is answered 0 below; avoid 2 / 0
    step = _div(_acc(tl.full([], 2, tl.int32), ACC_F64), _acc(size_m1, ACC_F64), ACC_F64)
    value = tl.where(i < size // 2, -1.0 + step * fi, 1.0 - step * _acc(size - 1 - i, ACC_F64))
    if not ALIGN:
        value = _div(value * _acc(size - 1, ACC_F64), _acc(size, ACC_F64), ACC_F64)
    return tl.where(size <= 1, 0.0, value)


@triton.jit
def _unnormalize(coord, size, ALIGN: tl.constexpr):
    # Normalised [-1, 1] -> pixel coordinate, and d(pixel)/d(grid). Halving is exact, so * 0.5
    # is the header's / 2.
    if ALIGN:
        scale = (size - 1).to(coord.dtype) * 0.5
        x = (coord + 1.0) * 0.5 * (size - 1).to(coord.dtype)
    else:
        scale = size.to(coord.dtype) * 0.5
        x = ((coord + 1.0) * size.to(coord.dtype) - 1.0) * 0.5
    return x, scale


@triton.jit
def _clip_coordinate(x, size):
    # Clamp to [0, size - 1]; grad 1 inside, 0 where clamped. NaN passes both tests and stays NaN
    # (with grad 1) for safe_coordinate to catch.
    high = (size - 1).to(x.dtype)
    low_side = x <= 0.0
    high_side = x >= high
    clipped = tl.where(low_side, 0.0, tl.where(high_side, high, x))
    grad = tl.where(low_side | high_side, 0.0, 1.0).to(x.dtype)
    return clipped, grad


@triton.jit
def _reflect_coordinate(x, twice_low, twice_high):
    # Reflect x into [low, high] (twice_low = 2 * low, twice_high = 2 * high, int32 scalars); grad
    # is the slope +-1 of the fold. x is finite here (the caller replaced the others).
    twice_low = tl.full([], twice_low, tl.int32)
    twice_high = tl.full([], twice_high, tl.int32)
    degenerate = twice_low == twice_high
    low = twice_low.to(x.dtype) * 0.5
    span = tl.where(degenerate, 1.0, (twice_high - twice_low).to(x.dtype) * 0.5).to(x.dtype)
    x = x - low
    negative = x < 0.0
    sign = tl.where(negative, -1.0, 1.0).to(x.dtype)
    x = tl.where(negative, -x, x)
    # The header's floor(x / span) (rounded division, as PyTorch) and fmod(x, span) (exact).
    # fmod: x - flips * span is exact through one fma whenever flips is the true floor; when the
    # rounded quotient reached the next integer the result is slightly negative, and adding span
    # back is exact again.
    flips = tl.floor(_div(x, span, x.dtype == tl.float64))
    extra = tl.fma(-flips, span, x)
    extra = tl.where(extra < 0.0, extra + span, extra)
    even = (flips - 2.0 * tl.floor(flips * 0.5)) == 0.0
    reflected = tl.where(even, extra + low, span - extra + low)
    grad = tl.where(even, sign, -sign)
    return tl.where(degenerate, 0.0, reflected).to(x.dtype), tl.where(degenerate, 0.0, grad).to(x.dtype)


@triton.jit
def _in_int_range(x):
    # safe_coordinate's range test: the int32 range as floats exact in fp32; false for NaN.
    return (x > -2147483648.0) & (x < 2147483520.0)


@triton.jit
def _safe_coordinate(x):
    return tl.where(_in_int_range(x), x, -100.0).to(x.dtype)


@triton.jit
def _source_index(coord, size, PADDING: tl.constexpr, ALIGN: tl.constexpr):
    # Normalised coordinate -> pixel coordinate after the padding rule, and d(pixel)/d(coord).
    x, scale = _unnormalize(coord, size, ALIGN)
    if PADDING == 1:  # border
        x, clip_grad = _clip_coordinate(x, size)
        scale = scale * clip_grad
    elif PADDING == 2:  # reflection
        ok = _in_int_range(x)
        # Out-of-range lanes (NaN, Inf, huge) go to -100 with grad 0; reflect the others only.
        x = tl.where(ok, x, 0.0).to(x.dtype)
        if ALIGN:
            x, reflect_grad = _reflect_coordinate(x, 0, 2 * (size - 1))
        else:
            x, reflect_grad = _reflect_coordinate(x, -1, 2 * size - 1)
        x, clip_grad = _clip_coordinate(x, size)
        scale = tl.where(ok, scale * (reflect_grad * clip_grad), 0.0).to(x.dtype)
        x = tl.where(ok, x, -100.0).to(x.dtype)
    x = _safe_coordinate(x)
    return x, scale


@triton.jit
def _nearest_index(x):
    # Round half to even (std::nearbyint), written out so the interpreter runs it too. x is finite
    # and within int32 (source_index); x - floor(x) is exact.
    f = tl.floor(x)
    d = x - f
    half = f * 0.5
    odd = tl.floor(half) != half
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f).to(tl.int32)


@triton.jit
def _bilinear_taps(x, y):
    # North-west corner (int32) and the distances dx0 = x - x0, dx1 = x0 + 1 - x (same for y).
    fx = tl.floor(x)
    fy = tl.floor(y)
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    dx0 = x - fx
    dx1 = fx + 1.0 - x
    dy0 = y - fy
    dy1 = fy + 1.0 - y
    return x0, y0, dx0, dx1, dy0, dy1


@triton.jit
def _theta_coords(t00, t01, t02, t10, t11, t12, oy, ox, Ho, Wo, ALIGN: tl.constexpr, ACC_F64: tl.constexpr):
    # Normalised source coordinates (gx, gy) of output pixels (oy, ox) under theta (its six
    # entries, loaded by the caller), and the affine base coordinates (bx, by).
    bx = _affine_base_coord(ox, Wo, ALIGN, ACC_F64)
    by = _affine_base_coord(oy, Ho, ALIGN, ACC_F64)
    # base_grid [bx, by, 1] @ theta^T, as F.affine_grid's bmm.
    gx = bx * _acc(t00, ACC_F64) + by * _acc(t01, ACC_F64) + _acc(t02, ACC_F64)
    gy = bx * _acc(t10, ACC_F64) + by * _acc(t11, ACC_F64) + _acc(t12, ACC_F64)
    return gx, gy, bx, by


@triton.jit
def _pix(v, CHANNELS_LAST: tl.constexpr):
    # A per-pixel vector as the pixel axis of a [pixels x channels] tile: pixels are the rows
    # (channels contiguous) for channels_last, the columns (pixels contiguous) for NCHW.
    if CHANNELS_LAST:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _chan(c, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return c[None, :]
    else:
        return c[:, None]


@triton.jit
def _zeros_tile(BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr):
    # An accumulator tile in the orientation of _pix/_chan.
    if ACC_F64:
        dtype: tl.constexpr = tl.float64
    else:
        dtype: tl.constexpr = tl.float32
    if CHANNELS_LAST:
        return tl.zeros([BLOCK_P, BLOCK_C], dtype=dtype)
    else:
        return tl.zeros([BLOCK_C, BLOCK_P], dtype=dtype)


@triton.jit
def _in_bounds(x, y, W, H):
    return (x >= 0) & (x < W) & (y >= 0) & (y < H)


@triton.jit
def _tap_offset(x, y, sh, sw):
    return y.to(tl.int64) * sh + x.to(tl.int64) * sw


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _grid_sample_fwd_kernel(
    x_ptr, coord_ptr, y_ptr,
    C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    sc0, sc1, sc2, sc3,
    syn, syc, syh, syw,
    INTERPOLATION: tl.constexpr, PADDING: tl.constexpr, ALIGN: tl.constexpr, AFFINE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Sizes as int32 scalar tensors (an int argument equal to 1 may arrive as a constexpr).
    H = tl.full([], H, tl.int32)
    W = tl.full([], W, tl.int32)
    Ho = tl.full([], Ho, tl.int32)
    Wo = tl.full([], Wo, tl.int32)
    P = Ho * Wo
    tiles = tl.cdiv(P, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = p < P
    oy = p // Wo
    ox = p % Wo
    # The coordinates are loaded here, not in a helper: torch.compile's analysis of which
    # arguments a kernel writes follows a helper's results back to every pointer passed to it,
    # so tap addresses computed from a helper given coord_ptr marked theta/grid as written.
    # grid: [N, Ho, Wo, 2] with strides sc0..sc3; theta: [N, 2, 3] with strides sc0..sc2.
    if AFFINE:
        t = coord_ptr + n * sc0
        gx, gy, bx, by = _theta_coords(tl.load(t), tl.load(t + sc2), tl.load(t + 2 * sc2), tl.load(t + sc1),
                                       tl.load(t + sc1 + sc2), tl.load(t + sc1 + 2 * sc2), oy, ox, Ho, Wo,
                                       ALIGN, ACC_F64)
    else:
        g = coord_ptr + n * sc0 + oy.to(tl.int64) * sc1 + ox.to(tl.int64) * sc2
        gx = _acc(tl.load(g, mask=mask_p, other=0.0), ACC_F64)
        gy = _acc(tl.load(g + sc3, mask=mask_p, other=0.0), ACC_F64)
        bx = gx
        by = gy
    x, scale_x = _source_index(gx, W, PADDING, ALIGN)
    y, scale_y = _source_index(gy, H, PADDING, ALIGN)

    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c2 = _chan(c, CHANNELS_LAST)
    mask = _pix(mask_p, CHANNELS_LAST) & (c2 < C)
    x_nc = x_ptr + n * sxn + c2.to(tl.int64) * sxc
    if INTERPOLATION == 0:
        x0, y0, dx0, dx1, dy0, dy1 = _bilinear_taps(x, y)
        x1 = x0 + 1
        y1 = y0 + 1
        # PyTorch's order: out = 0; out += v_nw * nw; += v_ne * ne; += v_sw * sw; += v_se * se
        # (an outside tap adds an exact zero).
        v = tl.load(x_nc + _pix(_tap_offset(x0, y0, sxh, sxw), CHANNELS_LAST),
                    mask=mask & _pix(_in_bounds(x0, y0, W, H), CHANNELS_LAST), other=0.0)
        acc = _acc(v, ACC_F64) * _pix(dx1 * dy1, CHANNELS_LAST)
        v = tl.load(x_nc + _pix(_tap_offset(x1, y0, sxh, sxw), CHANNELS_LAST),
                    mask=mask & _pix(_in_bounds(x1, y0, W, H), CHANNELS_LAST), other=0.0)
        acc += _acc(v, ACC_F64) * _pix(dx0 * dy1, CHANNELS_LAST)
        v = tl.load(x_nc + _pix(_tap_offset(x0, y1, sxh, sxw), CHANNELS_LAST),
                    mask=mask & _pix(_in_bounds(x0, y1, W, H), CHANNELS_LAST), other=0.0)
        acc += _acc(v, ACC_F64) * _pix(dx1 * dy0, CHANNELS_LAST)
        v = tl.load(x_nc + _pix(_tap_offset(x1, y1, sxh, sxw), CHANNELS_LAST),
                    mask=mask & _pix(_in_bounds(x1, y1, W, H), CHANNELS_LAST), other=0.0)
        acc += _acc(v, ACC_F64) * _pix(dx0 * dy0, CHANNELS_LAST)
    else:
        ix = _nearest_index(x)
        iy = _nearest_index(y)
        v = tl.load(x_nc + _pix(_tap_offset(ix, iy, sxh, sxw), CHANNELS_LAST),
                    mask=mask & _pix(_in_bounds(ix, iy, W, H), CHANNELS_LAST), other=0.0)
        acc = _acc(v, ACC_F64)
    y_off = n * syn + c2.to(tl.int64) * syc + _pix(_tap_offset(ox, oy, syh, syw), CHANNELS_LAST)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grid_sample_bwd_kernel(
    g_ptr, x_ptr, coord_ptr, gi_ptr, gc_ptr, part_ptr, key_ptr, wt_ptr,
    C, H, W, Ho, Wo, C_PER_PROGRAM,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    sin, sic, sih, siw,
    sc0, sc1, sc2, sc3,
    INTERPOLATION: tl.constexpr, PADDING: tl.constexpr, ALIGN: tl.constexpr, AFFINE: tl.constexpr,
    ATOMIC: tl.constexpr, KEYS: tl.constexpr, COORD_GRAD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (image x pixel tile, channel split). ATOMIC: add w * grad_output into gi (fp32/fp64
    # buffer) with atomics. KEYS: write key/weight of every (sample, tap) entry for the
    # deterministic gather. COORD_GRAD (bilinear only, one channel split): grad_grid into gc, or
    # the tile's grad_theta partial sums into part[n, tile, 0:6].
    H = tl.full([], H, tl.int32)
    W = tl.full([], W, tl.int32)
    Ho = tl.full([], Ho, tl.int32)
    Wo = tl.full([], Wo, tl.int32)
    P = Ho * Wo
    tiles = tl.cdiv(P, BLOCK_P)
    tile = tl.program_id(0) % tiles
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = p < P
    oy = p // Wo
    ox = p % Wo
    # Coordinates loaded here, not in a helper: see _grid_sample_fwd_kernel.
    if AFFINE:
        t = coord_ptr + n * sc0
        gx, gy, bx, by = _theta_coords(tl.load(t), tl.load(t + sc2), tl.load(t + 2 * sc2), tl.load(t + sc1),
                                       tl.load(t + sc1 + sc2), tl.load(t + sc1 + 2 * sc2), oy, ox, Ho, Wo,
                                       ALIGN, ACC_F64)
    else:
        g = coord_ptr + n * sc0 + oy.to(tl.int64) * sc1 + ox.to(tl.int64) * sc2
        gx = _acc(tl.load(g, mask=mask_p, other=0.0), ACC_F64)
        gy = _acc(tl.load(g + sc3, mask=mask_p, other=0.0), ACC_F64)
        bx = gx
        by = gy
    x, scale_x = _source_index(gx, W, PADDING, ALIGN)
    y, scale_y = _source_index(gy, H, PADDING, ALIGN)
    if INTERPOLATION == 0:
        x0, y0, dx0, dx1, dy0, dy1 = _bilinear_taps(x, y)
        x1 = x0 + 1
        y1 = y0 + 1
        w_nw = dx1 * dy1
        w_ne = dx0 * dy1
        w_sw = dx1 * dy0
        w_se = dx0 * dy0
        in_nw = _in_bounds(x0, y0, W, H)
        in_ne = _in_bounds(x1, y0, W, H)
        in_sw = _in_bounds(x0, y1, W, H)
        in_se = _in_bounds(x1, y1, W, H)
    else:
        x0 = _nearest_index(x)
        y0 = _nearest_index(y)
        in_nw = _in_bounds(x0, y0, W, H)

    if KEYS:
        # Entry e = (n * P + p) * TAPS + tap; key = n * (H*W + 1) + the tap's pixel in its image, or
        # n * (H*W + 1) + H*W (the image's sentinel) outside. Every key of image n sorts below image
        # n + 1's, sentinel included, so the entries can be sorted a run of images at a time.
        if INTERPOLATION == 0:
            e = ((n * P + p) * 4).to(tl.int64)
        else:
            e = (n * P + p).to(tl.int64)
        pixel0 = n * (H * W + 1)
        SENTINEL = pixel0 + H * W
        key_ty = key_ptr.dtype.element_ty
        k = tl.where(in_nw, pixel0 + y0.to(tl.int64) * W + x0, SENTINEL)
        tl.store(key_ptr + e, k.to(key_ty), mask=mask_p)
        if INTERPOLATION == 0:
            tl.store(wt_ptr + e, w_nw, mask=mask_p)
            k = tl.where(in_ne, pixel0 + y0.to(tl.int64) * W + x1, SENTINEL)
            tl.store(key_ptr + e + 1, k.to(key_ty), mask=mask_p)
            tl.store(wt_ptr + e + 1, w_ne, mask=mask_p)
            k = tl.where(in_sw, pixel0 + y1.to(tl.int64) * W + x0, SENTINEL)
            tl.store(key_ptr + e + 2, k.to(key_ty), mask=mask_p)
            tl.store(wt_ptr + e + 2, w_sw, mask=mask_p)
            k = tl.where(in_se, pixel0 + y1.to(tl.int64) * W + x1, SENTINEL)
            tl.store(key_ptr + e + 3, k.to(key_ty), mask=mask_p)
            tl.store(wt_ptr + e + 3, w_se, mask=mask_p)
        else:
            tl.store(wt_ptr + e, _acc(tl.full([BLOCK_P], 1, tl.int32), ACC_F64), mask=mask_p)

    if ATOMIC or COORD_GRAD:
        mask_pp = _pix(mask_p, CHANNELS_LAST)
        g_pix = g_ptr + n * sgn + _pix(_tap_offset(ox, oy, sgh, sgw), CHANNELS_LAST)
        if INTERPOLATION == 0:
            gi_nw = gi_ptr + n * sin + _pix(_tap_offset(x0, y0, sih, siw), CHANNELS_LAST)
            gi_ne = gi_ptr + n * sin + _pix(_tap_offset(x1, y0, sih, siw), CHANNELS_LAST)
            gi_sw = gi_ptr + n * sin + _pix(_tap_offset(x0, y1, sih, siw), CHANNELS_LAST)
            gi_se = gi_ptr + n * sin + _pix(_tap_offset(x1, y1, sih, siw), CHANNELS_LAST)
            m_nw = mask_pp & _pix(in_nw, CHANNELS_LAST)
            m_ne = mask_pp & _pix(in_ne, CHANNELS_LAST)
            m_sw = mask_pp & _pix(in_sw, CHANNELS_LAST)
            m_se = mask_pp & _pix(in_se, CHANNELS_LAST)
            w_nw2 = _pix(w_nw, CHANNELS_LAST)
            w_ne2 = _pix(w_ne, CHANNELS_LAST)
            w_sw2 = _pix(w_sw, CHANNELS_LAST)
            w_se2 = _pix(w_se, CHANNELS_LAST)
            dx0_2 = _pix(dx0, CHANNELS_LAST)
            dx1_2 = _pix(dx1, CHANNELS_LAST)
            dy0_2 = _pix(dy0, CHANNELS_LAST)
            dy1_2 = _pix(dy1, CHANNELS_LAST)
            x_nw = x_ptr + n * sxn + _pix(_tap_offset(x0, y0, sxh, sxw), CHANNELS_LAST)
            x_ne = x_ptr + n * sxn + _pix(_tap_offset(x1, y0, sxh, sxw), CHANNELS_LAST)
            x_sw = x_ptr + n * sxn + _pix(_tap_offset(x0, y1, sxh, sxw), CHANNELS_LAST)
            x_se = x_ptr + n * sxn + _pix(_tap_offset(x1, y1, sxh, sxw), CHANNELS_LAST)
        else:
            gi_nw = gi_ptr + n * sin + _pix(_tap_offset(x0, y0, sih, siw), CHANNELS_LAST)
            m_nw = mask_pp & _pix(in_nw, CHANNELS_LAST)
        # The coordinate-gradient sums over channels, kept as a tile and reduced once at the end.
        acc_x = _zeros_tile(BLOCK_P, BLOCK_C, CHANNELS_LAST, ACC_F64)
        acc_y = acc_x
        c_begin = tl.program_id(1) * C_PER_PROGRAM
        c_end = tl.minimum(c_begin + C_PER_PROGRAM, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            c = _chan(c0 + tl.arange(0, BLOCK_C), CHANNELS_LAST)
            mask_c = c < c_end
            c64 = c.to(tl.int64)
            go = _acc(tl.load(g_pix + c64 * sgc, mask=mask_pp & mask_c, other=0.0), ACC_F64)
            if ATOMIC:
                if INTERPOLATION == 0:
                    tl.atomic_add(gi_nw + c64 * sic, w_nw2 * go, mask=m_nw & mask_c, sem="relaxed")
                    tl.atomic_add(gi_ne + c64 * sic, w_ne2 * go, mask=m_ne & mask_c, sem="relaxed")
                    tl.atomic_add(gi_sw + c64 * sic, w_sw2 * go, mask=m_sw & mask_c, sem="relaxed")
                    tl.atomic_add(gi_se + c64 * sic, w_se2 * go, mask=m_se & mask_c, sem="relaxed")
                else:
                    tl.atomic_add(gi_nw + c64 * sic, go, mask=m_nw & mask_c, sem="relaxed")
            if COORD_GRAD:
                v_nw = _acc(tl.load(x_nw + c64 * sxc, mask=m_nw & mask_c, other=0.0), ACC_F64)
                v_ne = _acc(tl.load(x_ne + c64 * sxc, mask=m_ne & mask_c, other=0.0), ACC_F64)
                v_sw = _acc(tl.load(x_sw + c64 * sxc, mask=m_sw & mask_c, other=0.0), ACC_F64)
                v_se = _acc(tl.load(x_se + c64 * sxc, mask=m_se & mask_c, other=0.0), ACC_F64)
                # bilinear_coordinate_grad, times grad_output.
                acc_x += go * ((v_ne - v_nw) * dy1_2 + (v_se - v_sw) * dy0_2)
                acc_y += go * ((v_sw - v_nw) * dx1_2 + (v_se - v_ne) * dx0_2)
        if COORD_GRAD:
            if CHANNELS_LAST:
                red_axis: tl.constexpr = 1
            else:
                red_axis: tl.constexpr = 0
            grad_x = tl.sum(acc_x, axis=red_axis) * scale_x
            grad_y = tl.sum(acc_y, axis=red_axis) * scale_y
            if AFFINE:
                # This tile's share of grad_theta = sum over pixels of [gx; gy] x [bx, by, 1].
                grad_x = tl.where(mask_p, grad_x, 0.0)
                grad_y = tl.where(mask_p, grad_y, 0.0)
                part = part_ptr + (n * tiles + tile) * 6
                tl.store(part + 0, tl.sum(grad_x * bx, axis=0))
                tl.store(part + 1, tl.sum(grad_x * by, axis=0))
                tl.store(part + 2, tl.sum(grad_x, axis=0))
                tl.store(part + 3, tl.sum(grad_y * bx, axis=0))
                tl.store(part + 4, tl.sum(grad_y * by, axis=0))
                tl.store(part + 5, tl.sum(grad_y, axis=0))
            else:
                # grad_grid is a fresh contiguous [N, Ho, Wo, 2] tensor.
                gc = gc_ptr + (n * P + p) * 2
                gc_ty = gc_ptr.dtype.element_ty
                tl.store(gc, grad_x.to(gc_ty), mask=mask_p)
                tl.store(gc + 1, grad_y.to(gc_ty), mask=mask_p)


@triton.jit
def _grid_sample_gather_kernel(
    g_ptr, off_ptr, perm_ptr, wt_ptr, gi_ptr,
    C, H, W, Wo, NHW, P,
    sgn, sgc, sgh, sgw,
    sin, sic, sih, siw,
    TAPS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Deterministic grad_input: input pixel q (flat over N*H*W; key q + n, see the keys above)
    # sums weight * grad_output over its sorted entries [off[q + n], off[q + n + 1]) in order, for a
    # block of channels, and is written once. Every element is written (zero when no sample reads
    # the pixel).
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = q < NHW
    hw = H * W
    n = q // hw
    start = tl.load(off_ptr + q + n, mask=mask_q, other=0)
    count = (tl.load(off_ptr + q + n + 1, mask=mask_q, other=0) - start).to(tl.int32)
    longest = tl.max(count, axis=0)
    rem = q - n * hw
    iy = rem // W
    ix = rem - iy * W

    c = _chan(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), CHANNELS_LAST)
    mask_c = c < C
    c64 = c.to(tl.int64)
    acc = _zeros_tile(BLOCK_Q, BLOCK_C, CHANNELS_LAST, ACC_F64)
    g_nc = g_ptr + _pix(n * sgn, CHANNELS_LAST) + c64 * sgc
    for r in range(0, longest):
        live = mask_q & (r < count)
        # Unmasked loads at entry 0 for the idle rows (there is one: longest > 0), their weight
        # zeroed after: with a mask on these loads Triton 3.6 fails to compile the kernel at most
        # block shapes ("'tt.load' op failed to verify that mask type matches ptr type").
        e = tl.load(perm_ptr + tl.where(live, start + r, 0))
        w = tl.where(live, _acc(tl.load(wt_ptr + e), ACC_F64), 0.0)
        p = (e // TAPS) % P
        oy = p // Wo
        ox = p - oy * Wo
        go = tl.load(g_nc + _pix(oy * sgh + ox * sgw, CHANNELS_LAST),
                     mask=_pix(live, CHANNELS_LAST) & mask_c, other=0.0)
        acc += _pix(w, CHANNELS_LAST) * _acc(go, ACC_F64)
    gi_off = _pix(n * sin + iy * sih + ix * siw, CHANNELS_LAST) + c64 * sic
    tl.store(gi_ptr + gi_off, acc.to(gi_ptr.dtype.element_ty), mask=_pix(mask_q, CHANNELS_LAST) & mask_c)


# ----------------------------------------------------------------------------------------------
# Launchers


def _pow2(n):
    p = 1
    while p < n:
        p *= 2
    return p


def _channels_last(t):
    # Channel stride below the W stride: a tile whose fastest axis is channels coalesces.
    return t.shape[1] > 1 and t.stride(1) < t.stride(3)


def _blocks(channels, pixels, channels_last):
    """(BLOCK_P, BLOCK_C): the contiguous axis gets up to 64 (channels) or 256 (pixels) lanes,
    the other axis fills the tile; small maps and few channels shrink the blocks."""
    if channels_last:
        block_c = min(64, _pow2(channels))
        block_p = min(max(_TILE // block_c, 1), _pow2(pixels))
    else:
        block_p = min(256, _pow2(pixels))
        block_c = min(max(_TILE // block_p, 1), _pow2(channels))
    return block_p, block_c


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coord_strides(grid, theta):
    if theta is not None:
        return (*theta.stride(), 0)
    return tuple(grid.stride())


def _modes(interpolation, padding_mode, align_corners):
    interpolation, padding_mode = int(interpolation), int(padding_mode)
    if interpolation not in (0, 1):
        raise ValueError(f"grid_sample: interpolation must be 0 (bilinear) or 1 (nearest), got {interpolation}")
    if padding_mode not in (0, 1, 2):
        raise ValueError(
            f"grid_sample: padding_mode must be 0 (zeros), 1 (border) or 2 (reflection), got {padding_mode}")
    return dict(INTERPOLATION=interpolation, PADDING=padding_mode, ALIGN=bool(align_corners))


_OP = "grid_sample"
_TILE_AXES = ("batch x pixel tiles", "channel blocks")


@on_tensor_device
def forward(input, grid, theta, out_hw, interpolation, padding_mode, align_corners):
    n, c, h, w = input.shape
    ho, wo = out_hw
    affine = theta is not None
    coords = theta if affine else grid
    out = _empty((n, c, ho, wo), dtype=input.dtype, device=input.device, memory_format=_output_format(input))
    if out.numel() == 0:
        return out
    channels_last = _channels_last(input)
    block_p, block_c = _blocks(c, ho * wo, channels_last)
    launch_grid = _launch_grid(n * _cdiv(ho * wo, block_p), _cdiv(c, block_c), op=_OP,
                               axis_meaning=_TILE_AXES)
    torch.library.wrap_triton(_grid_sample_fwd_kernel)[launch_grid](
        input, coords, out,
        c, h, w, ho, wo,
        *input.stride(),
        *_coord_strides(grid, theta),
        *out.stride(),
        **_modes(interpolation, padding_mode, align_corners), AFFINE=affine,
        CHANNELS_LAST=channels_last, ACC_F64=input.dtype == torch.float64,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return out


def _sorted_entries(key_buf, images, per_image, keys_per_image):
    """(offsets, perm) of the deterministic backward: perm sorts key_buf stably, and key k's
    entries are perm[offsets[k]:offsets[k + 1]]. Image n's per_image entries have keys in
    [n * keys_per_image, (n + 1) * keys_per_image), its sentinel included, so runs of whole images
    can be sorted and searched apart and put end to end; each run stays within torch.sort's limit
    on CUDA (_MAX_SORT_ENTRIES, pytorch/pytorch#197470)."""
    total = key_buf.numel()
    key_dtype, device = key_buf.dtype, key_buf.device
    if not isinstance(total, int) or total <= _MAX_SORT_ENTRIES:
        sorted_keys, perm = torch.sort(key_buf, stable=True)
        return torch.searchsorted(sorted_keys, torch.arange(images * keys_per_image + 1, dtype=key_dtype,
                                                            device=device)), perm
    if per_image > _MAX_SORT_ENTRIES:
        raise ValueError(
            f"grid_sample (Triton): the deterministic backward sorts {per_image} entries for one image, more "
            f"than torch.sort's {_MAX_SORT_ENTRIES}; use the default (atomic) backward or a smaller output")
    offsets = torch.empty(images * keys_per_image + 1, dtype=torch.int64, device=device)
    perm = torch.empty(total, dtype=torch.int64, device=device)
    run = _MAX_SORT_ENTRIES // per_image  # images per run
    sorted_run = torch.empty(run * per_image, dtype=key_dtype, device=device)
    for first in range(0, images, run):
        last = min(images, first + run)
        lo, hi = first * per_image, last * per_image
        # Sorted straight into perm and one reused key buffer: these runs are gigabytes.
        sorted_keys = sorted_run[:hi - lo]
        torch.sort(key_buf[lo:hi], stable=True, out=(sorted_keys, perm[lo:hi]))
        perm[lo:hi] += lo
        keys = torch.arange(first * keys_per_image, last * keys_per_image, dtype=key_dtype, device=device)
        offsets[first * keys_per_image:last * keys_per_image] = torch.searchsorted(sorted_keys, keys) + lo
    offsets[-1] = total
    return offsets, perm


@on_tensor_device
def backward(grad_output, input, grid, theta, interpolation, padding_mode, align_corners, output_mask,
             deterministic):
    n, c, h, w = input.shape
    ho, wo = grad_output.shape[2], grad_output.shape[3]
    affine = theta is not None
    coords = theta if affine else grid
    need_input, need_coords = bool(output_mask[0]), bool(output_mask[1])
    modes = _modes(interpolation, padding_mode, align_corners)
    nearest = modes["INTERPOLATION"] == 1
    fmt = _output_format(input)
    channels_last = _channels_last(input)
    acc_f64 = input.dtype == torch.float64
    acc_dtype = _acc_dtype(input.dtype)
    samples = n * ho * wo

    grad_input = input.new_empty(0)
    grad_coords = input.new_empty(0)
    # Nearest sampling is piecewise constant in the coordinates: their gradient is zero (PyTorch).
    # So is every gradient of an empty sum.
    coord_grad = need_coords and not nearest and c > 0 and samples > 0
    if need_coords and not coord_grad:
        grad_coords = torch.zeros(coords.shape, dtype=coords.dtype, device=coords.device)
    scatter = need_input and c > 0 and samples > 0
    if need_input and not scatter:
        grad_input = torch.zeros_like(input, memory_format=fmt)
    if not (scatter or coord_grad):
        return grad_input, grad_coords
    atomic = scatter and not deterministic
    keys = scatter and bool(deterministic)

    block_p, block_c = _blocks(c, ho * wo, channels_last)
    tiles = _cdiv(ho * wo, block_p)
    # Atomic-only work has no per-pixel channel sum: spread the channels over programs too.
    splits = _cdiv(c, block_c) if (atomic and not coord_grad) else 1
    c_per_program = block_c * _cdiv(_cdiv(c, block_c), splits)
    taps = 1 if nearest else 4
    nhw = n * h * w

    if atomic:
        gi_buffer = torch.zeros_like(input, dtype=acc_dtype, memory_format=fmt)
    elif keys:
        gi_buffer = _empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    else:
        gi_buffer = None
    if keys:
        num_keys = n * (h * w + 1)  # each image's pixels and its sentinel
        key_dtype = torch.int32 if num_keys < 2**31 - 1 else torch.int64
        key_buf = _empty((taps * samples,), dtype=key_dtype, device=input.device)
        wt_buf = _empty((taps * samples,), dtype=acc_dtype, device=input.device)
    part = None
    if coord_grad:
        if affine:
            part = _empty((n, tiles, 6), dtype=acc_dtype, device=input.device)
        else:
            grad_coords = _empty(coords.shape, dtype=coords.dtype, device=coords.device)
    # Pointers a configuration does not use get a stand-in tensor (never dereferenced).
    stand_in = input
    gi_strides = gi_buffer.stride() if gi_buffer is not None else input.stride()
    backward_grid = _launch_grid(n * tiles, splits, op=_OP, axis_meaning=_TILE_AXES)
    torch.library.wrap_triton(_grid_sample_bwd_kernel)[backward_grid](
        grad_output, input, coords,
        gi_buffer if atomic else stand_in,
        grad_coords if (coord_grad and not affine) else stand_in,
        part if part is not None else stand_in,
        key_buf if keys else stand_in,
        wt_buf if keys else stand_in,
        c, h, w, ho, wo, c_per_program,
        *grad_output.stride(),
        *input.stride(),
        *gi_strides,
        *_coord_strides(grid, theta),
        **modes, AFFINE=affine, ATOMIC=atomic, KEYS=keys, COORD_GRAD=coord_grad,
        CHANNELS_LAST=channels_last, ACC_F64=acc_f64,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
    if coord_grad and affine:
        # Fixed-order reduction of the per-tile partial sums.
        grad_coords = part.sum(dim=1).view(n, 2, 3).to(coords.dtype)

    if atomic:
        grad_input = gi_buffer if gi_buffer.dtype == input.dtype else gi_buffer.to(input.dtype)
    elif keys:
        offsets, perm = _sorted_entries(key_buf, n, taps * ho * wo, h * w + 1)
        block_q, block_cg = _blocks(c, nhw, channels_last)
        gather_grid = _launch_grid(_cdiv(nhw, block_q), _cdiv(c, block_cg), op=_OP,
                                   axis_meaning=("input pixel tiles", "channel blocks"))
        torch.library.wrap_triton(_grid_sample_gather_kernel)[gather_grid](
            grad_output, offsets, perm, wt_buf, gi_buffer,
            c, h, w, wo, nhw, ho * wo,
            *grad_output.stride(),
            *gi_buffer.stride(),
            TAPS=taps, CHANNELS_LAST=channels_last, ACC_F64=acc_f64,
            BLOCK_Q=block_q, BLOCK_C=block_cg,
        )
        grad_input = gi_buffer
    return grad_input, grad_coords
