// Autograd of fastcnn::grid_sample and fastcnn::affine_grid_sample (C++ and CUDA kernels), in C++
// as torchvision does it: a Python torch.library.register_autograd wrapper costs ~28 us a call,
// a tenth of the whole forward of a 64x1x28x28 STN batch. The backwards call the registered
// backward ops, so dispatch, fakes and torch.compile see the same ops as before; the backward
// ops have autograd too (second order through PyTorch's sampler).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastcnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

using BackwardResult = std::tuple<at::Tensor, at::Tensor>;
using BackwardSignature = BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         bool, std::array<bool, 2>);

at::Tensor call_grid_sample(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                            int64_t padding_mode, bool align_corners) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::grid_sample", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool)>();
  return op.call(input, grid, interpolation, padding_mode, align_corners);
}

at::Tensor call_affine_grid_sample(const at::Tensor& input, const at::Tensor& theta, c10::SymIntArrayRef out_size,
                                   int64_t interpolation, int64_t padding_mode, bool align_corners) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcnn::affine_grid_sample", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, int64_t, int64_t, bool)>();
  return op.call(input, theta, out_size, interpolation, padding_mode, align_corners);
}

using BackwardOp = c10::TypedOperatorHandle<BackwardSignature>;

BackwardOp find_backward(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<BackwardSignature>();
}

// Whether a call must go through Function::apply: grad mode on and an input that requires grad,
// or a forward-mode tangent (which apply rejects, as it should). Otherwise the kernel is called
// directly: apply builds a graph node and its saved-data map on every call (a 1x1x2x2 forward
// through fastcnn.ops, one thread: 10.9 -> 9.3 us; 64x1x28x28: 1.05x).
bool records_autograd(const at::Tensor& input, const at::Tensor& coords) {
  return (at::GradMode::is_enabled() && (input.requires_grad() || coords.requires_grad())) ||
         input._fw_grad(0).defined() || coords._fw_grad(0).defined();
}

// Shared by both ops: saves (input, coords) and the sampling options, returns
// (grad_input, grad_coords) for the tensors that need them.
void save(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& coords, int64_t interpolation,
          int64_t padding_mode, bool align_corners) {
  ctx->saved_data["interpolation"] = interpolation;
  ctx->saved_data["padding_mode"] = padding_mode;
  ctx->saved_data["align_corners"] = align_corners;
  ctx->save_for_backward({input, coords});
}

variable_list backward(const BackwardOp& op, AutogradContext* ctx, const variable_list& grad_outputs, size_t extra) {
  const auto saved = ctx->get_saved_variables();
  const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
  auto [grad_input, grad_coords] =
      op.call(grad_outputs[0], saved[0], saved[1], ctx->saved_data["interpolation"].toInt(),
              ctx->saved_data["padding_mode"].toInt(), ctx->saved_data["align_corners"].toBool(), mask);
  variable_list grads = {mask[0] ? grad_input : Variable(), mask[1] ? grad_coords : Variable()};
  grads.resize(2 + extra);
  return grads;
}

class GridSampleFunction : public torch::autograd::Function<GridSampleFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& grid,
                               int64_t interpolation, int64_t padding_mode, bool align_corners) {
    save(ctx, input, grid, interpolation, padding_mode, align_corners);
    at::AutoDispatchBelowADInplaceOrView guard;
    return {call_grid_sample(input, grid, interpolation, padding_mode, align_corners)};
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    static const BackwardOp op = find_backward("fastcnn::_grid_sample_backward");
    return fastcnn::backward(op, ctx, grad_outputs, 3);
  }
};

class AffineGridSampleFunction : public torch::autograd::Function<AffineGridSampleFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& theta,
                               c10::SymIntArrayRef out_size, int64_t interpolation, int64_t padding_mode,
                               bool align_corners) {
    save(ctx, input, theta, interpolation, padding_mode, align_corners);
    at::AutoDispatchBelowADInplaceOrView guard;
    return {call_affine_grid_sample(input, theta, out_size, interpolation, padding_mode, align_corners)};
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    static const BackwardOp op = find_backward("fastcnn::_affine_grid_sample_backward");
    return fastcnn::backward(op, ctx, grad_outputs, 4);
  }
};

// The backward ops as differentiable functions of (grad_output, input, grid | theta), for gradients
// of gradients (a gradient penalty on an STN): the kernels' backward is not written twice; the
// second order differentiates PyTorch's grid_sampler_2d (after affine_grid_generator for theta)
// twice, on the saved tensors. Exact to PyTorch's arithmetic, at PyTorch's speed; a non-finite
// coordinate follows PyTorch there (see fastcnn/ops/grid_sample.py). The third order is refused
// (below).
class SamplerBackwardFunction : public torch::autograd::Function<SamplerBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, bool affine, const at::Tensor& grad_output,
                               const at::Tensor& input, const at::Tensor& coords, int64_t interpolation,
                               int64_t padding_mode, bool align_corners, std::array<bool, 2> output_mask) {
    ctx->saved_data["affine"] = affine;
    ctx->saved_data["interpolation"] = interpolation;
    ctx->saved_data["padding_mode"] = padding_mode;
    ctx->saved_data["align_corners"] = align_corners;
    ctx->saved_data["output_mask"] = c10::List<bool>({output_mask[0], output_mask[1]});
    ctx->save_for_backward({grad_output, input, coords});
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_coords] = backward_op(affine).call(grad_output, input, coords, interpolation,
                                                             padding_mode, align_corners, output_mask);
    return {grad_input, grad_coords};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& cotangents) {
    const bool affine = ctx->saved_data["affine"].toBool();
    // In grad mode the engine wants a result with a graph (a third order to come); the leaves
    // below would give it one that ends there, and a silent zero after it.
    TORCH_CHECK(!at::GradMode::is_enabled(), "fastcnn::", affine ? "affine_grid_sample" : "grid_sample",
                ": gradients of order three and higher are not supported (the second order differentiates "
                "PyTorch's grid_sampler_2d; for higher orders run the op on fastcnn.use_backend('reference'))");
    const auto computed = ctx->saved_data["output_mask"].toBoolList();
    std::vector<size_t> which;
    for (size_t i = 0; i < 2; ++i)
      if (computed.get(i) && cotangents[i].defined()) which.push_back(i);
    variable_list grads(8);
    if (which.empty()) return grads;
    const auto saved = ctx->get_saved_variables();
    at::AutoGradMode enable_grad(true);
    // Leaves of their own, so that the nested differentiation stays inside this node (reaching
    // into the saved tensors' history, it released nodes the outer pass had yet to run).
    const at::Tensor grad_output = saved[0].detach().requires_grad_(), input = saved[1].detach().requires_grad_(),
                     coords = saved[2].detach().requires_grad_();
    const auto& size = grad_output.sym_sizes();
    const at::Tensor grid =
        affine ? at::affine_grid_generator_symint(coords, {size[0], size[1], size[2], size[3]},
                                                  ctx->saved_data["align_corners"].toBool())
               : coords;
    const at::Tensor output =
        at::grid_sampler_2d(input, grid, ctx->saved_data["interpolation"].toInt(),
                            ctx->saved_data["padding_mode"].toInt(), ctx->saved_data["align_corners"].toBool());
    const auto first = torch::autograd::grad({output}, {input, coords}, {grad_output}, /*retain_graph=*/true,
                                             /*create_graph=*/true, /*allow_unused=*/true);
    variable_list differentiated, cotangent_list;
    for (size_t i : which) {
      if (!first[i].defined() || !first[i].requires_grad()) continue;  // e.g. nearest: grad_grid is zero
      differentiated.push_back(first[i]);
      cotangent_list.push_back(cotangents[i]);
    }
    if (differentiated.empty()) return grads;
    const auto second = torch::autograd::grad(differentiated, {grad_output, input, coords}, cotangent_list,
                                              /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    // Edges: grad_output, input, coords are the tensor arguments 1-3 (after `affine`).
    for (size_t i = 0; i < 3; ++i)
      if (ctx->needs_input_grad(i)) grads[1 + i] = second[i];
    return grads;
  }

 private:
  static const BackwardOp& backward_op(bool affine) {
    static const BackwardOp grid = find_backward("fastcnn::_grid_sample_backward");
    static const BackwardOp theta = find_backward("fastcnn::_affine_grid_sample_backward");
    return affine ? theta : grid;
  }
};

at::Tensor grid_sample_autograd(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                int64_t padding_mode, bool align_corners) {
  if (!records_autograd(input, grid)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_grid_sample(input, grid, interpolation, padding_mode, align_corners);
  }
  return GridSampleFunction::apply(input, grid, interpolation, padding_mode, align_corners)[0];
}

at::Tensor affine_grid_sample_autograd(const at::Tensor& input, const at::Tensor& theta,
                                       c10::SymIntArrayRef out_size, int64_t interpolation, int64_t padding_mode,
                                       bool align_corners) {
  if (!records_autograd(input, theta)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_affine_grid_sample(input, theta, out_size, interpolation, padding_mode, align_corners);
  }
  return AffineGridSampleFunction::apply(input, theta, out_size, interpolation, padding_mode, align_corners)[0];
}

// The backward ops record only where a gradient of the gradient is asked for (the backward of a
// first-order step runs with grad mode off): otherwise straight to the kernel.
template <bool Affine>
BackwardResult sampler_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& coords, int64_t interpolation, int64_t padding_mode,
                                         bool align_corners, std::array<bool, 2> output_mask) {
  const bool needs_grad = grad_output.requires_grad() || input.requires_grad() || coords.requires_grad();
  if (!(at::GradMode::is_enabled() && needs_grad) && !grad_output._fw_grad(0).defined() &&
      !input._fw_grad(0).defined() && !coords._fw_grad(0).defined()) {
    static const BackwardOp op =
        find_backward(Affine ? "fastcnn::_affine_grid_sample_backward" : "fastcnn::_grid_sample_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(grad_output, input, coords, interpolation, padding_mode, align_corners, output_mask);
  }
  auto grads = SamplerBackwardFunction::apply(Affine, grad_output, input, coords, interpolation, padding_mode,
                                              align_corners, output_mask);
  return {grads[0], grads[1]};
}

}  // namespace
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) {
  m.impl("_grid_sample_backward", TORCH_FN(fastcnn::sampler_backward_autograd<false>));
  m.impl("_affine_grid_sample_backward", TORCH_FN(fastcnn::sampler_backward_autograd<true>));
  m.impl("grid_sample", TORCH_FN(fastcnn::grid_sample_autograd));
  m.impl("affine_grid_sample", TORCH_FN(fastcnn::affine_grid_sample_autograd));
}
