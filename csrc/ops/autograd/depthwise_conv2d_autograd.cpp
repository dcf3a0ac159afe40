// Autograd of fastcnn::depthwise_conv2d (C++ and CUDA kernels), in C++ as torchvision does it:
// a Python torch.library.register_autograd wrapper costs ~15 us a call, visible on the 7x7 and
// 14x14 layers at batch 1. The backward calls the registered backward op, so dispatch, fakes
// and torch.compile see the same two ops as before; the backward op has autograd too, written
// with the two ops, for gradients of any order.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastcnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::depthwise_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef)>();
  return op.call(input, weight, bias, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                             const at::Tensor& weight, c10::SymIntArrayRef stride,
                                                             c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
                                                             std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::_depthwise_conv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           c10::SymIntArrayRef, c10::SymIntArrayRef, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, stride, padding, dilation, output_mask);
}

class DepthwiseConv2dFunction : public torch::autograd::Function<DepthwiseConv2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                               c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->save_for_backward({input, weight});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {call_forward(input, weight, bias, stride, padding, dilation)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges are the tensor arguments present: input, weight, then bias if given.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    const auto stride = ctx->saved_data["stride"].toSymIntVector();
    const auto padding = ctx->saved_data["padding"].toSymIntVector();
    const auto dilation = ctx->saved_data["dilation"].toSymIntVector();
    auto [grad_input, grad_weight, grad_bias] =
        call_backward(grad_outputs[0], saved[0], saved[1], stride, padding, dilation, mask);
    return {mask[0] ? grad_input : Variable(), mask[1] ? grad_weight : Variable(),
            mask[2] ? grad_bias : Variable(), Variable(), Variable(), Variable()};
  }
};

// The backward op as a differentiable function of (grad_output, input, weight), for gradients of
// gradients (gradient penalties, Hessian-vector products). It is bilinear:
//   grad_input  = conv_transpose(grad_output, weight)   grad_weight = correlate(input, grad_output)
//   grad_bias   = sum of grad_output
// so, for cotangents (gg_input, gg_weight, gg_bias) of its outputs, through the two ops themselves:
//   d grad_output = depthwise_conv2d(gg_input, weight, gg_bias) + depthwise_conv2d(input, gg_weight)
//   d input       = grad_input of the backward with weight gg_weight
//   d weight      = grad_weight of the backward with input gg_input
// Called in grad mode these record again, so every order of derivative has a graph.
class DepthwiseConv2dBackwardFunction : public torch::autograd::Function<DepthwiseConv2dBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& weight, c10::SymIntArrayRef stride, c10::SymIntArrayRef padding,
                               c10::SymIntArrayRef dilation, std::array<bool, 3> output_mask) {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["output_mask"] = c10::List<bool>({output_mask[0], output_mask[1], output_mask[2]});
    ctx->save_for_backward({grad_output, input, weight});
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_weight, grad_bias] =
        call_backward(grad_output, input, weight, stride, padding, dilation, output_mask);
    return {grad_input, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& cotangents) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_output = saved[0], &input = saved[1], &weight = saved[2];
    const auto stride = ctx->saved_data["stride"].toSymIntVector();
    const auto padding = ctx->saved_data["padding"].toSymIntVector();
    const auto dilation = ctx->saved_data["dilation"].toSymIntVector();
    const auto computed = ctx->saved_data["output_mask"].toBoolList();
    // An output the backward did not compute (an empty tensor) has no cotangent worth reading.
    const auto cotangent = [&](size_t i) {
      return computed.get(i) && cotangents[i].defined() ? cotangents[i] : at::Tensor();
    };
    const at::Tensor gg_input = cotangent(0), gg_weight = cotangent(1), gg_bias = cotangent(2);
    at::Tensor d_grad_output, d_input, d_weight;
    if (ctx->needs_input_grad(0)) {
      if (gg_input.defined())
        d_grad_output = call_forward(gg_input, weight, gg_bias.defined() ? std::optional<at::Tensor>(gg_bias)
                                                                         : std::nullopt,
                                     stride, padding, dilation);
      if (gg_weight.defined()) {
        const auto through_weight = call_forward(input, gg_weight, std::nullopt, stride, padding, dilation);
        d_grad_output = d_grad_output.defined() ? d_grad_output + through_weight : through_weight;
      }
      if (gg_bias.defined() && !gg_input.defined()) {
        const auto through_bias = gg_bias.view({1, -1, 1, 1}).expand_as(grad_output);
        d_grad_output = d_grad_output.defined() ? d_grad_output + through_bias : through_bias.clone();
      }
    }
    if (ctx->needs_input_grad(1) && gg_weight.defined())
      d_input = std::get<0>(call_backward(grad_output, input, gg_weight, stride, padding, dilation, {true, false, false}));
    if (ctx->needs_input_grad(2) && gg_input.defined())
      d_weight = std::get<1>(call_backward(grad_output, gg_input, weight, stride, padding, dilation, {false, true, false}));
    return {d_grad_output, d_input, d_weight, Variable(), Variable(), Variable(), Variable()};
  }
};

// Whether a call must go through Function::apply: grad mode on and a tensor that requires grad,
// or a forward-mode tangent (which apply rejects, as it should). Otherwise the kernel is called
// directly, without the graph node and saved-data map apply builds on every call (through
// fastcnn.ops, one thread: 1x16x2x2 13.2 -> 10.5 us; the 1x512x14x14 channels_last layer 1.08x).
bool records_autograd(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  const bool needs_grad = input.requires_grad() || weight.requires_grad() || (has_bias && bias->requires_grad());
  return (at::GradMode::is_enabled() && needs_grad) || input._fw_grad(0).defined() ||
         weight._fw_grad(0).defined() || (has_bias && bias->_fw_grad(0).defined());
}

at::Tensor depthwise_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                                     c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
  if (!records_autograd(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(input, weight, bias, stride, padding, dilation);
  }
  return DepthwiseConv2dFunction::apply(input, weight, bias, stride, padding, dilation)[0];
}

// The backward op records only where a gradient of the gradient is asked for (the backward of a
// first-order step runs with grad mode off): otherwise straight to the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, std::array<bool, 3> output_mask) {
  const bool needs_grad = grad_output.requires_grad() || input.requires_grad() || weight.requires_grad();
  if (!(at::GradMode::is_enabled() && needs_grad) && !grad_output._fw_grad(0).defined() &&
      !input._fw_grad(0).defined() && !weight._fw_grad(0).defined()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(grad_output, input, weight, stride, padding, dilation, output_mask);
  }
  auto grads = DepthwiseConv2dBackwardFunction::apply(grad_output, input, weight, stride, padding, dilation, output_mask);
  return {grads[0], grads[1], grads[2]};
}

}  // namespace
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) {
  m.impl("depthwise_conv2d", TORCH_FN(fastcnn::depthwise_conv2d_autograd));
  m.impl("_depthwise_conv2d_backward", TORCH_FN(fastcnn::depthwise_conv2d_backward_autograd));
}
