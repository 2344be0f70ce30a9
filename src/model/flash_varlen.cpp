// libtorch's variable-length flash attention (aten::_flash_attention_forward with
// cumulative sequence lengths) for distill's packed rows on CUDA. tch 0.24 binds its
// backward but not its forward; the call below goes through the dispatcher, so autograd
// records it (FlashAttentionBackward0) exactly as for a PyTorch caller.
//
// Returns NULL on success, or a malloc'd message (freed by distill_flash_free_message):
// a C++ exception must not unwind into Rust.
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <string>

static char* flash_message(const std::string& m) {
  char* out = static_cast<char*>(std::malloc(m.size() + 1));
  std::memcpy(out, m.c_str(), m.size() + 1);
  return out;
}

extern "C" {

void distill_flash_free_message(char* m) { std::free(m); }

// q [total, heads, head_dim], k and v [total, kv_heads, head_dim] (bf16 or f16, CUDA),
// `cu` int32 [segments + 1] cumulative starts shared by queries and keys, causal.
// `scale` < 0: 1 / sqrt(head_dim); `window_left` < 0: no sliding window.
char* distill_flash_varlen(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, const at::Tensor* cu,
                           int64_t max_len, double scale, int64_t window_left, at::Tensor** out) {
  try {
    std::optional<double> s = scale < 0 ? std::nullopt : std::optional<double>(scale);
    std::optional<int64_t> left = window_left < 0 ? std::nullopt : std::optional<int64_t>(window_left);
    std::optional<int64_t> right = window_left < 0 ? std::nullopt : std::optional<int64_t>(0);
    auto result = at::_flash_attention_forward(*q, *k, *v, *cu, *cu, max_len, max_len, 0.0, /*is_causal=*/true,
                                               /*return_debug_mask=*/false, s, left, right);
    *out = new at::Tensor(std::get<0>(result));
    return nullptr;
  } catch (const std::exception& e) {
    return flash_message(e.what());
  } catch (...) {
    return flash_message("unknown C++ exception");
  }
}
}
