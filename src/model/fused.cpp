// RMSNorm and the gated MLP as autograd functions with their own backward, for
// training: autograd over the decomposed operations keeps what each operation needs
// (the norm: its input and normalised output; the MLP: gate, activation, up and their
// product, four tensors of the MLP's width per token), these keep what the backward
// cannot cheaply remake (the norm: its input and one reciprocal RMS per row; the MLP:
// its input, gate and up) and recompute the elementwise rest. The forward runs the very
// operations of `layers.rs` in the same order, so a training forward gives the bits of an
// inference one. tch binds no custom autograd function; this shim is compiled by
// build.rs like flash_varlen.cpp.
//
// Each entry point returns NULL with `*out` set, or a malloc'd message (freed by
// distill_fused_free_message): a C++ exception must not unwind into Rust.
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace {

char* fused_message(const std::string& m) {
  char* out = static_cast<char*>(std::malloc(m.size() + 1));
  std::memcpy(out, m.c_str(), m.size() + 1);
  return out;
}

// The normalised input in float32: x * rsqrt(mean(x^2) + eps), and that reciprocal RMS.
std::pair<at::Tensor, at::Tensor> normalise(const at::Tensor& x, double eps) {
  auto xf = x.to(at::kFloat);
  auto variance = xf.square().mean({-1}, /*keepdim=*/true, at::kFloat);
  auto rstd = (variance + eps).rsqrt();
  return {xf * rstd, rstd};
}

// y = w * normed (cast back to x's type first), or Gemma's (normed * (1 + w)) cast back.
at::Tensor norm_output(const at::Tensor& x, const at::Tensor& normed, const at::Tensor& weight, bool plus_one) {
  if (plus_one) return (normed * (weight.to(at::kFloat) + 1.0)).to(x.scalar_type());
  return weight * normed.to(x.scalar_type());
}

// The norm's gradients (dx, dweight) for output gradient `dy`; undefined where not needed.
std::pair<at::Tensor, at::Tensor> norm_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd, bool plus_one, bool need_dx, bool need_dw) {
  auto dy = dy_in.to(at::kFloat);
  auto normed = x.to(at::kFloat) * rstd;
  at::Tensor dweight, dx;
  if (need_dw) {
    // Every position's contribution summed into the weight's [hidden].
    auto n = plus_one ? normed : normed.to(x.scalar_type()).to(at::kFloat);
    dweight = (dy.reshape({-1, dy.size(-1)}) * n.reshape({-1, n.size(-1)})).sum(0).to(weight.scalar_type());
  }
  if (need_dx) {
    auto dn = dy * (plus_one ? weight.to(at::kFloat) + 1.0 : weight.to(at::kFloat));
    // d(x * rstd)/dx with rstd = (mean(x^2) + eps)^-1/2.
    dx = (rstd * (dn - normed * (dn * normed).mean({-1}, /*keepdim=*/true))).to(x.scalar_type());
  }
  return {dx, dweight};
}

// Activations as `layers.rs::Activation` numbers them: 0 SiLU, 1 GELU (tanh), 2 GELU.
at::Tensor activate(const at::Tensor& g, int64_t activation) {
  if (activation == 0) return at::silu(g);
  return at::gelu(g, activation == 1 ? "tanh" : "none");
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& g, int64_t activation) {
  if (activation == 0) return at::silu_backward(grad, g);
  return at::gelu_backward(grad, g, activation == 1 ? "tanh" : "none");
}

// down(act(gate(x)) * up(x)) and the gate and up outputs that its backward keeps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_forward(const at::Tensor& x, const at::Tensor& gate_w,
                                                           const at::Tensor& up_w, const at::Tensor& down_w,
                                                           int64_t activation) {
  auto gate = at::linear(x, gate_w);
  auto up = at::linear(x, up_w);
  auto y = at::linear(activate(gate, activation) * up, down_w);
  return {y, gate, up};
}

struct MlpGrads {
  at::Tensor dx, gate_w, up_w, down_w;
};

// The gradients of down(act(gate(x)) * up(x)) from the kept gate and up outputs.
// `need`: x, gate, up, down.
MlpGrads mlp_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                      const at::Tensor& gate_w, const at::Tensor& up_w, const at::Tensor& down_w, int64_t activation,
                      const bool need[4]) {
  const int64_t hidden = x.size(-1), width = gate.size(-1);
  auto dy = dy_in.reshape({-1, down_w.size(0)});
  auto g = gate.reshape({-1, width});
  auto u = up.reshape({-1, width});
  auto x2 = x.reshape({-1, hidden});
  MlpGrads out;
  auto act = activate(g, activation);
  if (need[3]) out.down_w = dy.t().mm(act * u);
  auto d_product = dy.mm(down_w);
  auto d_up = d_product * act;
  act.reset();
  auto d_gate = activation_backward(d_product * u, g, activation);
  d_product.reset();
  if (need[1]) out.gate_w = d_gate.t().mm(x2);
  if (need[2]) out.up_w = d_up.t().mm(x2);
  if (need[0]) out.dx = d_gate.mm(gate_w).add_(d_up.mm(up_w)).view(x.sizes());
  return out;
}

struct RmsNormFunction : public Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                            bool plus_one) {
    auto [normed, rstd] = normalise(x, eps);
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["plus_one"] = plus_one;
    return norm_output(x, normed, weight, plus_one);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [dx, dw] = norm_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["plus_one"].toBool(),
                                  ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

// down(act(gate(x)) * up(x)), without biases.
struct GatedMlpFunction : public Function<GatedMlpFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate_w,
                            const at::Tensor& up_w, const at::Tensor& down_w, int64_t activation) {
    auto [y, gate, up] = mlp_forward(x, gate_w, up_w, down_w, activation);
    ctx->save_for_backward({x, gate, up, gate_w, up_w, down_w});
    ctx->saved_data["activation"] = activation;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const bool need[4] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                          ctx->needs_input_grad(3)};
    auto g = mlp_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["activation"].toInt(), need);
    return {g.dx, g.gate_w, g.up_w, g.down_w, at::Tensor()};
  }
};

// The MLP of a normed input, mlp(norm(x)): keeps x and the norm's reciprocal RMS instead
// of the normed input, which the backward remakes (the same bits as the forward's).
struct NormGatedMlpFunction : public Function<NormGatedMlpFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& gate_w,
                            const at::Tensor& up_w, const at::Tensor& down_w, double eps, bool plus_one,
                            int64_t activation) {
    auto [normed, rstd] = normalise(x, eps);
    auto h = norm_output(x, normed, norm_w, plus_one);
    normed.reset();
    auto [y, gate, up] = mlp_forward(h, gate_w, up_w, down_w, activation);
    h.reset();
    ctx->save_for_backward({x, norm_w, rstd, gate, up, gate_w, up_w, down_w});
    ctx->saved_data["plus_one"] = plus_one;
    ctx->saved_data["activation"] = activation;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto &x = s[0], &norm_w = s[1], &rstd = s[2];
    const bool plus_one = ctx->saved_data["plus_one"].toBool();
    auto h = norm_output(x, x.to(at::kFloat) * rstd, norm_w, plus_one);
    const bool need_h = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    const bool need[4] = {need_h, ctx->needs_input_grad(2), ctx->needs_input_grad(3), ctx->needs_input_grad(4)};
    auto g = mlp_backward(grads[0], h, s[3], s[4], s[5], s[6], s[7], ctx->saved_data["activation"].toInt(), need);
    h.reset();
    at::Tensor dx, dw;
    if (need_h) {
      std::tie(dx, dw) = norm_backward(g.dx, x, norm_w, rstd, plus_one, ctx->needs_input_grad(0),
                                       ctx->needs_input_grad(1));
    }
    return {dx, dw, g.gate_w, g.up_w, g.down_w, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// Runs `make` into `*out`: NULL, or the message of the C++ exception it threw.
template <typename Make>
char* guarded(at::Tensor** out, Make make) {
  try {
    *out = new at::Tensor(make());
    return nullptr;
  } catch (const std::exception& e) {
    return fused_message(e.what());
  } catch (...) {
    return fused_message("unknown C++ exception");
  }
}

extern "C" {

void distill_fused_free_message(char* m) { std::free(m); }

char* distill_fused_rms_norm(const at::Tensor* x, const at::Tensor* weight, double eps, bool plus_one,
                             at::Tensor** out) {
  return guarded(out, [&] { return RmsNormFunction::apply(*x, *weight, eps, plus_one); });
}

char* distill_fused_norm_gated_mlp(const at::Tensor* x, const at::Tensor* norm_w, const at::Tensor* gate_w,
                                   const at::Tensor* up_w, const at::Tensor* down_w, double eps, bool plus_one,
                                   int64_t activation, at::Tensor** out) {
  return guarded(out, [&] {
    return NormGatedMlpFunction::apply(*x, *norm_w, *gate_w, *up_w, *down_w, eps, plus_one, activation);
  });
}

char* distill_fused_gated_mlp(const at::Tensor* x, const at::Tensor* gate_w, const at::Tensor* up_w,
                              const at::Tensor* down_w, int64_t activation, at::Tensor** out) {
  return guarded(out, [&] { return GatedMlpFunction::apply(*x, *gate_w, *up_w, *down_w, activation); });
}

// Whether a function above would be recorded for backward: grad mode on, autocast off
// (its casts belong to the decomposed operations), and some input requiring grad.
bool distill_fused_wanted(const at::Tensor* a, const at::Tensor* b) {
  if (!at::GradMode::is_enabled()) return false;
  if (!a->requires_grad() && !b->requires_grad()) return false;
  auto type = a->device().type();
  return !at::autocast::is_autocast_enabled(type);
}
}
