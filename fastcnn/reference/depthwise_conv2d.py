"""Depthwise convolution as stock PyTorch computes it: F.conv2d with groups equal to channels."""
import torch.nn.functional as F


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """`padding` is what F.conv2d takes (int, pair, 'same', 'valid') or the explicit
    [top, bottom, left, right] of the fastcnn op."""
    if isinstance(padding, (list, tuple)) and len(padding) == 4:
        top, bottom, left, right = padding
        if top == bottom and left == right:
            padding = (top, left)
        else:
            input = F.pad(input, (left, right, top, bottom))
            padding = 0
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])
