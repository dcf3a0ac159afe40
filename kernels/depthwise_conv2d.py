"""Triton kernels for depthwise 2-D convolution (MobileNets, Howard et al. 2017).

Reference op: ``torch.nn.functional.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias,
stride, 0, dilation, groups=C)`` with weight [C, 1, kH, kW].

Launchers (registered by ``fastcnn.ops.depthwise_conv2d`` as a ``torch.library.triton_op``):

    forward(input, weight, bias, stride, padding, dilation) -> output
    backward(grad_output, input, weight, stride, padding, dilation, output_mask)
        -> (grad_input, grad_weight, grad_bias)

stride = (sh, sw), padding = (top, bottom, left, right), dilation = (dh, dw). Every tensor is
read through its strides (NCHW, channels_last, views, zero-stride expanded gradients), so nothing
is copied. The launchers only allocate tensors and launch kernels, which keeps them traceable by
torch.compile. The backward uses no atomics: grad_input is a gather, grad_weight/grad_bias are
per-split partial sums reduced in a fixed order by a second kernel, so results are bitwise
reproducible.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv as _cdiv, grid as _grid, memory_format as _output_format, on_tensor_device

# Test seam: the interpreted tests replace this with a NaN-filling allocator so that an element a
# kernel forgets to write fails the comparison instead of passing by luck.
_empty = torch.empty

# Elements of one program's [pixels x channels] tile. 1024 fp32 accumulators are 8 registers a
# thread at 4 warps: enough work per program without spilling.
_TILE = 1024
# Program count the grad_weight reduction aims for; enough to fill an H100's 132 SMs a few times
# over while keeping the partial-sum buffer (programs x BLOCK_C floats) small.
_GRAD_WEIGHT_PROGRAMS = 2048


@triton.jit
def _depthwise_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    syn, syc, syh, syw,
    pad_t, pad_l, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Batch folded into grid axis 0 (axes 1 and 2 stop at 65535).
    tiles = tl.cdiv(Ho * Wo, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # Put the memory-contiguous axis last so that neighbouring threads touch neighbouring
    # addresses: channels for channels_last, pixels for NCHW.
    if CHANNELS_LAST:
        p = p[:, None]
        c = c[None, :]
    else:
        p = p[None, :]
        c = c[:, None]
    # The tile's shape is whichever orientation was chosen above.
    if ACC_F64:
        acc = tl.zeros(((p + c) * 0).shape, dtype=tl.float64)
    else:
        acc = tl.zeros(((p + c) * 0).shape, dtype=tl.float32)

    mask_c = c < C
    mask = (p < Ho * Wo) & mask_c
    oy = p // Wo
    ox = p % Wo
    iy0 = oy * SH - pad_t
    ix0 = ox * SW - pad_l
    c64 = c.to(tl.int64)
    # Pointer of tap (0, 0); every other tap is a scalar offset from it. It may point before the
    # tensor (padding); it is only dereferenced under the bounds mask.
    x_tap0 = x_ptr + n * sxn + c64 * sxc + iy0.to(tl.int64) * sxh + ix0.to(tl.int64) * sxw
    w_c = w_ptr + c64 * swc
    for ky in range(KH):
        iy = iy0 + ky * dil_h
        mask_y = mask & (iy >= 0) & (iy < H)
        x_row = x_tap0 + (ky * dil_h).to(tl.int64) * sxh
        for kx in range(KW):
            ix = ix0 + kx * dil_w
            m = mask_y & (ix >= 0) & (ix < W)
            xv = tl.load(x_row + (kx * dil_w).to(tl.int64) * sxw, mask=m, other=0.0)
            wv = tl.load(w_c + ky * swh + kx * sww, mask=mask_c, other=0.0)
            acc += xv.to(acc.dtype) * wv.to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c64, mask=mask_c, other=0.0).to(acc.dtype)
    y_off = n * syn + c64 * syc + oy.to(tl.int64) * syh + ox.to(tl.int64) * syw
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _depthwise_conv2d_grad_input_kernel(
    g_ptr, w_ptr, gx_ptr,
    C, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    swc, swh, sww,
    sxn, sxc, sxh, sxw,
    pad_t, pad_l, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Gather form: each input pixel sums over the taps that read it, so no two programs write
    # the same element and no atomics are needed.
    tiles = tl.cdiv(H * W, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        p = p[:, None]
        c = c[None, :]
    else:
        p = p[None, :]
        c = c[:, None]
    # The tile's shape is whichever orientation was chosen above.
    if ACC_F64:
        acc = tl.zeros(((p + c) * 0).shape, dtype=tl.float64)
    else:
        acc = tl.zeros(((p + c) * 0).shape, dtype=tl.float32)

    mask_c = c < C
    mask = (p < H * W) & mask_c
    iy = p // W
    ix = p % W
    c64 = c.to(tl.int64)
    g_nc = g_ptr + n * sgn + c64 * sgc
    w_c = w_ptr + c64 * swc
    for ky in range(KH):
        ty = iy + pad_t - ky * dil_h
        # Test the sign before dividing: integer division truncates toward zero, so a negative
        # numerator could otherwise pass as output row 0.
        oy = ty // SH
        mask_y = mask & (ty >= 0) & (ty - oy * SH == 0) & (oy < Ho)
        g_row = g_nc + oy.to(tl.int64) * sgh
        for kx in range(KW):
            tx = ix + pad_l - kx * dil_w
            ox = tx // SW
            m = mask_y & (tx >= 0) & (tx - ox * SW == 0) & (ox < Wo)
            gv = tl.load(g_row + ox.to(tl.int64) * sgw, mask=m, other=0.0)
            wv = tl.load(w_c + ky * swh + kx * sww, mask=mask_c, other=0.0)
            acc += gv.to(acc.dtype) * wv.to(acc.dtype)
    gx_off = n * sxn + c64 * sxc + iy.to(tl.int64) * sxh + ix.to(tl.int64) * sxw
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _depthwise_conv2d_grad_weight_partial_kernel(
    g_ptr, x_ptr, pw_ptr, pb_ptr,
    C, H, W, Ho, Wo, TILES, UNITS, UNITS_PER_PROGRAM,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    pad_t, pad_l, dil_h, dil_w,
    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (channel block, tap, split): the split's share of sum over (n, oy, ox) of
    # grad_output * input at that tap. One tap per program keeps the accumulator one tile even
    # for 31x31 kernels. The partial sums go to pw[split, tap, c] and are reduced in a fixed
    # order by _depthwise_conv2d_sum_partials_kernel.
    tap = tl.program_id(1)
    split = tl.program_id(2)
    num_taps = tl.num_programs(1)
    ky = tap // KW
    kx = tap - ky * KW
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_in_tile = tl.arange(0, BLOCK_P)
    if CHANNELS_LAST:
        p_in_tile = p_in_tile[:, None]
        c = c[None, :]
    else:
        p_in_tile = p_in_tile[None, :]
        c = c[:, None]
    if ACC_F64:
        acc_w = tl.zeros(((p_in_tile + c) * 0).shape, dtype=tl.float64)
    else:
        acc_w = tl.zeros(((p_in_tile + c) * 0).shape, dtype=tl.float32)
    acc_b = acc_w
    mask_c = c < C
    c64 = c.to(tl.int64)
    tap_dy = ky * dil_h - pad_t
    tap_dx = kx * dil_w - pad_l

    unit_start = split * UNITS_PER_PROGRAM
    unit_end = tl.minimum(unit_start + UNITS_PER_PROGRAM, UNITS)
    # A unit is one tile of one image's output pixels, so the batch index is a scalar division.
    for unit in range(unit_start, unit_end):
        n = (unit // TILES).to(tl.int64)
        p = (unit % TILES) * BLOCK_P + p_in_tile
        mask = (p < Ho * Wo) & mask_c
        oy = p // Wo
        ox = p % Wo
        g_off = n * sgn + c64 * sgc + oy.to(tl.int64) * sgh + ox.to(tl.int64) * sgw
        gv = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(acc_w.dtype)
        if NEED_W:
            iy = oy * SH + tap_dy
            ix = ox * SW + tap_dx
            m = mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            x_off = n * sxn + c64 * sxc + iy.to(tl.int64) * sxh + ix.to(tl.int64) * sxw
            xv = tl.load(x_ptr + x_off, mask=m, other=0.0)
            acc_w += gv * xv.to(acc_w.dtype)
        if NEED_B:
            acc_b += gv

    if CHANNELS_LAST:
        red_axis: tl.constexpr = 0
    else:
        red_axis: tl.constexpr = 1
    c_out = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_out = c_out < C
    split64 = split.to(tl.int64)
    if NEED_W:
        pw_off = (split64 * num_taps + tap) * C + c_out
        tl.store(pw_ptr + pw_off, tl.sum(acc_w, axis=red_axis), mask=mask_out)
    if NEED_B:
        # Every tap program sees the same grad_output; the tap-0 one writes the bias partial.
        tl.store(pb_ptr + split64 * C + c_out, tl.sum(acc_b, axis=red_axis), mask=mask_out & (tap == 0))


@triton.jit
def _depthwise_conv2d_sum_partials_kernel(
    part_ptr, out_ptr, SPLITS, TAPS, C, so_c, so_tap,
    ACC_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    # part[split, tap, c] -> out[c, tap], summing splits in index order (deterministic).
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    numel = TAPS * C
    mask = e < numel
    if ACC_F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * numel + e, mask=mask, other=0.0).to(acc.dtype)
    tap = e // C
    c = e - tap * C
    tl.store(out_ptr + c * so_c + tap * so_tap, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
    the other axis fills the tile; small maps (7x7) and few channels shrink the blocks."""
    if channels_last:
        block_c = min(64, _pow2(channels))
        block_p = min(max(_TILE // block_c, 1), _pow2(pixels))
    else:
        block_p = min(256, _pow2(pixels))
        block_c = min(max(_TILE // block_p, 1), _pow2(channels))
    return block_p, block_c


def _readable(t, stand_in):
    """`t`, or `stand_in` (same dtype) when `t` is empty: an input of zero rows or columns can
    still have outputs (all padding); its loads are all masked off, but a GPU launch should not
    be handed the null data pointer of an empty tensor."""
    return t if t.numel() > 0 else stand_in


def _output_size(size, k, stride, pad_begin, pad_end, dilation):
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def _acc_f64(dtype):
    return dtype == torch.float64


_OP = "depthwise_conv2d"
_TILE_AXES = ("batch x pixel tiles", "channel blocks")


@on_tensor_device
def forward(input, weight, bias, stride, padding, dilation):
    n, c, h, w = input.shape
    kh, kw = weight.shape[2], weight.shape[3]
    sh, sw = int(stride[0]), int(stride[1])
    top, bottom, left, right = padding
    dh, dw = dilation
    ho = _output_size(h, kh, sh, top, bottom, dh)
    wo = _output_size(w, kw, sw, left, right, dw)
    out = _empty((n, c, ho, wo), dtype=input.dtype, device=input.device,
                 memory_format=_output_format(input))
    if out.numel() == 0:
        return out
    channels_last = _channels_last(input)
    block_p, block_c = _blocks(c, ho * wo, channels_last)
    grid = _grid(n * _cdiv(ho * wo, block_p), _cdiv(c, block_c), op=_OP, axis_meaning=_TILE_AXES)
    torch.library.wrap_triton(_depthwise_conv2d_fwd_kernel)[grid](
        _readable(input, weight), weight, bias if bias is not None else weight, out,
        c, h, w, ho, wo,
        *input.stride(),
        weight.stride(0), weight.stride(2), weight.stride(3),
        *out.stride(),
        top, left, dh, dw,
        KH=kh, KW=kw, SH=sh, SW=sw,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last, ACC_F64=_acc_f64(input.dtype),
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return out


@on_tensor_device
def backward(grad_output, input, weight, stride, padding, dilation, output_mask):
    n, c, h, w = input.shape
    kh, kw = weight.shape[2], weight.shape[3]
    sh, sw = int(stride[0]), int(stride[1])
    top, bottom, left, right = padding
    dh, dw = dilation
    ho, wo = grad_output.shape[2], grad_output.shape[3]
    channels_last = _channels_last(input)
    acc_f64 = _acc_f64(input.dtype)
    need_input, need_weight, need_bias = (bool(m) for m in output_mask)

    grad_input = input.new_empty(0)
    if need_input:
        grad_input = _empty(input.shape, dtype=input.dtype, device=input.device,
                            memory_format=_output_format(input))
        if grad_input.numel() > 0:
            block_p, block_c = _blocks(c, h * w, channels_last)
            grid = _grid(n * _cdiv(h * w, block_p), _cdiv(c, block_c), op=_OP, axis_meaning=_TILE_AXES)
            torch.library.wrap_triton(_depthwise_conv2d_grad_input_kernel)[grid](
                grad_output, weight, grad_input,
                c, h, w, ho, wo,
                *grad_output.stride(),
                weight.stride(0), weight.stride(2), weight.stride(3),
                *grad_input.stride(),
                top, left, dh, dw,
                KH=kh, KW=kw, SH=sh, SW=sw,
                CHANNELS_LAST=channels_last, ACC_F64=acc_f64,
                BLOCK_P=block_p, BLOCK_C=block_c,
            )

    grad_weight = input.new_empty(0)
    grad_bias = input.new_empty(0)
    if not (need_weight or need_bias):
        return grad_input, grad_weight, grad_bias
    if grad_output.numel() == 0:
        # Empty batch (or no channels): the sums over N*Ho*Wo are empty, hence zero.
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        if need_bias:
            grad_bias = torch.zeros((c,), dtype=weight.dtype, device=weight.device)
        return grad_input, grad_weight, grad_bias

    block_p, block_c = _blocks(c, ho * wo, channels_last)
    tiles = _cdiv(ho * wo, block_p)
    units = n * tiles
    taps = kh * kw if need_weight else 1
    channel_blocks = _cdiv(c, block_c)
    splits = max(1, min(units, _cdiv(_GRAD_WEIGHT_PROGRAMS, channel_blocks * taps)))
    units_per_program = _cdiv(units, splits)
    splits = _cdiv(units, units_per_program)
    acc_dtype = torch.float64 if acc_f64 else torch.float32
    part_w = _empty((splits, taps, c), dtype=acc_dtype, device=input.device) if need_weight else None
    part_b = _empty((splits, c), dtype=acc_dtype, device=input.device) if need_bias else None
    dummy = part_w if part_w is not None else part_b
    partial_grid = _grid(channel_blocks, taps, splits, op=_OP, axis_meaning=("channel blocks", "kernel taps", "splits"))
    torch.library.wrap_triton(_depthwise_conv2d_grad_weight_partial_kernel)[partial_grid](
        grad_output, _readable(input, weight),
        part_w if part_w is not None else dummy, part_b if part_b is not None else dummy,
        c, h, w, ho, wo, tiles, units, units_per_program,
        *grad_output.stride(),
        *input.stride(),
        top, left, dh, dw,
        KW=kw, SH=sh, SW=sw,
        NEED_W=need_weight, NEED_B=need_bias, CHANNELS_LAST=channels_last, ACC_F64=acc_f64,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
    block = 256
    if need_weight:
        grad_weight = _empty(weight.shape, dtype=weight.dtype, device=weight.device)
        torch.library.wrap_triton(_depthwise_conv2d_sum_partials_kernel)[(_cdiv(taps * c, block),)](
            part_w, grad_weight, splits, taps, c, kh * kw, 1,
            ACC_F64=acc_f64, BLOCK=block,
        )
    if need_bias:
        grad_bias = _empty((c,), dtype=weight.dtype, device=weight.device)
        torch.library.wrap_triton(_depthwise_conv2d_sum_partials_kernel)[(_cdiv(c, block),)](
            part_b, grad_bias, splits, 1, c, 1, 1,
            ACC_F64=acc_f64, BLOCK=block,
        )
    return grad_input, grad_weight, grad_bias
