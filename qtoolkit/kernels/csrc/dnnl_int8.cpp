// qtoolkit's int8 convolution and linear on oneDNN's C++ API with the primitive built once per input shape.
//
// torch's onednn::qconv_pointwise builds a oneDNN primitive descriptor on every call (tens of microseconds per
// convolution: most of a small convolution's time at batch 1).  A QConv object holds everything a layer's call
// needs that does not depend on the input -- int8 weights, per-channel output scales, bias in accumulator units,
// zero points, post-ops -- and keeps, per input shape, the primitive, the weights reordered into the layout that
// primitive wants, and the argument map.  A call sets two data pointers and executes.
//
// Numerics (oneDNN 2.x int8 convolution):
//   acc = sum(q_x * q_w)  [int32, exact]; with the source zero point: sum((q_x - z_x) * q_w)
//   y   = os[oc] * (float(acc) + b[oc])                         (b in accumulator units)
//   y   = y + sum_scale * (old_dst - sum_zp)                     (optional sum post-op)
//   y   = relu(y)                                               (optional)
//   out = saturate(round_half_even(y) + z_out)                  (u8 / s8), or y (f32)
// With a nonzero z_out, an eltwise_round post-op rounds y before oneDNN adds z_out: adding z_out first, in
// float32, would round y + z_out to float32 (a step of 2^-17 near 100), and values within that of a half-way
// point would round the other way than the fake-quant model's round(y), which keeps y's own float32 precision.
//
// add_u8: the residual add on uint8 codes with the fake-quant model's float32 arithmetic, operation for operation:
//   out = clamp(round_half_even(fl((qa - za) * sa) + fl((qb - zb) * sb)) * inv_so) + zo, lo, hi)
// (the dequantized operands, their float32 sum, times float32 1/so), so its codes equal the fake-quant model's.
//
// Built by qtoolkit/kernels/dnnl_ext.py with torch.utils.cpp_extension against the system oneDNN (libdnnl).
#include <torch/extension.h>

#include <oneapi/dnnl/dnnl.hpp>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& cpu_stream() {
  thread_local dnnl::stream s(cpu_engine());
  return s;
}

dt dtype_of(int64_t kind) {
  switch (kind) {
    case 0: return dt::f32;
    case 1: return dt::u8;
    case 2: return dt::s8;
    default: TORCH_CHECK(false, "qtoolkit dnnl: out_kind must be 0 (f32), 1 (u8) or 2 (s8), got ", kind);
  }
}

at::ScalarType scalar_of(int64_t kind) {
  switch (kind) {
    case 0: return at::kFloat;
    case 1: return at::kByte;
    default: return at::kChar;
  }
}

bool is_reference(const char* impl) {
  std::string s(impl);
  return s.rfind("ref", 0) == 0 || s.find(":ref") != std::string::npos || s.find("ref:") != std::string::npos;
}

constexpr size_t kMaxShapes = 8;

// One primitive with everything a call needs but the two data pointers.
struct Entry {
  std::mutex mu;  // one call at a time per entry: the memory objects and scratchpad are shared
  dnnl::primitive prim;
  memory src, dst, wei, bias;
  std::unordered_map<int, memory> args;
  int64_t oh = 0, ow = 0;  // convolution output size
  std::string impl;
};

// Output scales, zero points and post-ops (sum, then ReLU) shared by the convolution and the matmul.
struct Quant {
  torch::Tensor os, bias;  // float32 [OC] (or [1]) scales; float32 [OC] bias in accumulator units (or undefined)
  int64_t out_kind = 1;
  bool has_sum = false;
  dnnl::primitive_attr attr;

  Quant(const torch::Tensor& out_scales, const c10::optional<torch::Tensor>& b, int64_t oc, int64_t x_zp, int64_t out_zp,
        int64_t kind, bool relu, bool sum, double sum_scale, int64_t sum_zp)
      : out_kind(kind), has_sum(sum) {
    dtype_of(kind);
    os = out_scales.to(at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK(os.numel() == 1 || os.numel() == oc, "qtoolkit dnnl: out_scales must have 1 or ", oc, " elements");
    if (b.has_value() && b->defined()) {
      bias = b->to(at::kFloat).contiguous().reshape({-1});
      TORCH_CHECK(bias.numel() == oc, "qtoolkit dnnl: bias must have ", oc, " elements");
    }
    std::vector<float> scales(os.data_ptr<float>(), os.data_ptr<float>() + os.numel());
    attr.set_output_scales(scales.size() > 1 ? 2 : 0, scales);
    if (x_zp != 0) attr.set_zero_points(DNNL_ARG_SRC, 0, {static_cast<int32_t>(x_zp)});
    if (out_zp != 0) attr.set_zero_points(DNNL_ARG_DST, 0, {static_cast<int32_t>(out_zp)});
    dnnl::post_ops po;
    if (sum) po.append_sum(static_cast<float>(sum_scale), static_cast<int32_t>(sum_zp), dtype_of(kind));
    if (relu) po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    if (out_zp != 0 && kind != 0) po.append_eltwise(1.f, dnnl::algorithm::eltwise_round, 0.f, 0.f);
    attr.set_post_ops(po);
  }

  // The entry of a primitive descriptor: the primitive, the weights reordered into its layout, the argument map.
  template <class Primitive>
  std::shared_ptr<Entry> entry(const typename Primitive::primitive_desc& pd, const memory::desc& src_md,
                               const memory::desc& wei_user, void* weights, const memory::desc& bias_md) const {
    auto& eng = cpu_engine();
    auto ep = std::make_shared<Entry>();
    Entry& e = *ep;
    e.impl = pd.impl_info_str();
    TORCH_CHECK(!is_reference(e.impl.c_str()), "qtoolkit dnnl: oneDNN has only its reference implementation (", e.impl,
                ") for this layer here");
    e.prim = Primitive(pd);
    memory wu(wei_user, eng, weights);
    e.wei = memory(pd.weights_desc(), eng);
    dnnl::reorder(wu, e.wei).execute(cpu_stream(), wu, e.wei);
    cpu_stream().wait();
    e.src = memory(src_md, eng, DNNL_MEMORY_NONE);
    e.dst = memory(pd.dst_desc(), eng, DNNL_MEMORY_NONE);
    e.args = {{DNNL_ARG_SRC, e.src}, {DNNL_ARG_WEIGHTS, e.wei}, {DNNL_ARG_DST, e.dst}};
    if (bias.defined()) {
      e.bias = memory(bias_md, eng, bias.data_ptr());
      e.args.insert({DNNL_ARG_BIAS, e.bias});
    }
    if (pd.scratchpad_desc().get_size() > 0) e.args.insert({DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), eng)});
    return ep;
  }

  // The output tensor: a new one, or the sum post-op's accumulator (checked, written in place).
  torch::Tensor output(const c10::optional<torch::Tensor>& acc, at::IntArrayRef sizes, bool channels_last) const {
    const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    if (!has_sum) return torch::empty(sizes, torch::TensorOptions().dtype(scalar_of(out_kind)).memory_format(fmt));
    TORCH_CHECK(acc.has_value() && acc->defined(), "qtoolkit dnnl: this layer has a sum post-op: pass acc");
    const torch::Tensor& y = *acc;
    TORCH_CHECK(y.scalar_type() == scalar_of(out_kind) && y.sizes() == sizes && y.is_contiguous(fmt),
                "qtoolkit dnnl: acc must be a ", channels_last ? "channels_last " : "contiguous ", sizes,
                " tensor of the output dtype");
    return y;
  }
};

torch::Tensor execute(Entry& e, const torch::Tensor& x, const torch::Tensor& y) {
  std::lock_guard<std::mutex> lock(e.mu);
  e.src.set_data_handle(x.data_ptr());
  e.dst.set_data_handle(y.data_ptr());
  e.prim.execute(cpu_stream(), e.args);
  return y;
}

// Entries by input shape, built on first use; at most kMaxShapes kept, the oldest dropped first.
template <class Key>
class ShapeCache {
 public:
  template <class Make>
  std::shared_ptr<Entry> get(const Key& key, Make&& make) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : cache_) {
      if (kv.first == key) return kv.second;
    }
    auto e = make();
    if (cache_.size() >= kMaxShapes) cache_.pop_front();
    cache_.emplace_back(key, e);
    return e;
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(cache_.size());
  }

 private:
  std::mutex mu_;
  std::list<std::pair<Key, std::shared_ptr<Entry>>> cache_;
};

class QConv {
 public:
  QConv(torch::Tensor w, torch::Tensor out_scales, c10::optional<torch::Tensor> bias, std::vector<int64_t> stride,
        std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, int64_t x_zp, int64_t out_zp,
        int64_t out_kind, bool relu, bool has_sum, double sum_scale, int64_t sum_zp)
      : stride_(std::move(stride)), padding_(std::move(padding)), dilation_(std::move(dilation)), groups_(groups),
        q_(out_scales, bias, w.dim() == 4 ? w.size(0) : 0, x_zp, out_zp, out_kind, relu, has_sum, sum_scale, sum_zp) {
    TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4, "qtoolkit dnnl: conv weight must be 4-D int8");
    TORCH_CHECK(stride_.size() == 2 && padding_.size() == 2 && dilation_.size() == 2, "qtoolkit dnnl: 2-D geometry");
    TORCH_CHECK(groups_ >= 1 && w.size(0) % groups_ == 0, "qtoolkit dnnl: bad groups");
    w_ = w.contiguous();
    oc_ = w_.size(0);
    icg_ = w_.size(1);
    kh_ = w_.size(2);
    kw_ = w_.size(3);
  }

  // x: [N, C, H, W] uint8 (channels_last avoids a copy); acc (sum post-op): [N, OC, OH, OW] of the output dtype,
  // channels_last, written in place and returned.
  torch::Tensor run(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& acc) {
    TORCH_CHECK(x_in.scalar_type() == at::kByte && x_in.dim() == 4, "qtoolkit dnnl: conv input must be 4-D uint8");
    TORCH_CHECK(x_in.device().is_cpu(), "qtoolkit dnnl: conv input must be on the CPU");
    TORCH_CHECK(x_in.size(1) == icg_ * groups_, "qtoolkit dnnl: conv input has ", x_in.size(1), " channels, expected ",
                icg_ * groups_);
    const torch::Tensor x = x_in.is_contiguous(at::MemoryFormat::ChannelsLast)
                                ? x_in
                                : x_in.contiguous(at::MemoryFormat::ChannelsLast);
    const std::shared_ptr<Entry> e = entry(x.size(0), x.size(2), x.size(3));
    return execute(*e, x, q_.output(acc, {x.size(0), oc_, e->oh, e->ow}, true));
  }

  std::string impl(int64_t n, int64_t h, int64_t w) { return entry(n, h, w)->impl; }

  int64_t cached_shapes() { return cache_.size(); }

 private:
  std::shared_ptr<Entry> entry(int64_t n, int64_t h, int64_t w) {
    return cache_.get({n, h, w}, [&] { return make(n, h, w); });
  }

  std::shared_ptr<Entry> make(int64_t n, int64_t h, int64_t w) {
    const int64_t kdh = (kh_ - 1) * dilation_[0] + 1, kdw = (kw_ - 1) * dilation_[1] + 1;
    const int64_t oh = (h + 2 * padding_[0] - kdh) / stride_[0] + 1;
    const int64_t ow = (w + 2 * padding_[1] - kdw) / stride_[1] + 1;
    TORCH_CHECK(oh > 0 && ow > 0, "qtoolkit dnnl: input ", h, "x", w, " is smaller than the kernel");
    memory::desc src_md({n, icg_ * groups_, h, w}, dt::u8, tag::nhwc);
    memory::desc dst_md({n, oc_, oh, ow}, dtype_of(q_.out_kind), tag::nhwc);
    memory::dims wdims = groups_ > 1 ? memory::dims{groups_, oc_ / groups_, icg_, kh_, kw_}
                                     : memory::dims{oc_, icg_, kh_, kw_};
    memory::desc wei_user(wdims, dt::s8, groups_ > 1 ? tag::goihw : tag::oihw);
    memory::desc bias_md = q_.bias.defined() ? memory::desc({oc_}, dt::f32, tag::x) : memory::desc();
    const memory::dims pad{padding_[0], padding_[1]};
    dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src_md,
                                      memory::desc(wdims, dt::s8, tag::any), bias_md, dst_md,
                                      {stride_[0], stride_[1]}, {dilation_[0] - 1, dilation_[1] - 1}, pad, pad);
    auto e = q_.entry<dnnl::convolution_forward>(dnnl::convolution_forward::primitive_desc(d, q_.attr, cpu_engine()),
                                                 src_md, wei_user, w_.data_ptr(), bias_md);
    e->oh = oh;
    e->ow = ow;
    return e;
  }

  torch::Tensor w_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_;
  Quant q_;
  int64_t oc_ = 0, icg_ = 0, kh_ = 0, kw_ = 0;
  ShapeCache<std::array<int64_t, 3>> cache_;
};

// int8 Linear as oneDNN matmul: [M, K] uint8 x [K, N] int8 -> [M, N]; the same numerics as QConv.
class QLinear {
 public:
  QLinear(torch::Tensor w, torch::Tensor out_scales, c10::optional<torch::Tensor> bias, int64_t x_zp, int64_t out_zp,
          int64_t out_kind, bool relu, bool has_sum, double sum_scale, int64_t sum_zp)
      : q_(out_scales, bias, w.dim() == 2 ? w.size(0) : 0, x_zp, out_zp, out_kind, relu, has_sum, sum_scale, sum_zp) {
    TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "qtoolkit dnnl: linear weight must be 2-D int8");
    w_ = w.contiguous();
    n_ = w_.size(0);
    k_ = w_.size(1);
  }

  // x: [M, K] uint8; acc (sum post-op): [M, N] of the output dtype, contiguous, written in place and returned.
  torch::Tensor run(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& acc) {
    TORCH_CHECK(x_in.scalar_type() == at::kByte && x_in.dim() == 2, "qtoolkit dnnl: linear input must be 2-D uint8");
    TORCH_CHECK(x_in.device().is_cpu(), "qtoolkit dnnl: linear input must be on the CPU");
    TORCH_CHECK(x_in.size(1) == k_, "qtoolkit dnnl: linear input has ", x_in.size(1), " features, expected ", k_);
    TORCH_CHECK(x_in.size(0) > 0, "qtoolkit dnnl: empty linear input");
    const torch::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
    const int64_t m = x.size(0);
    const std::shared_ptr<Entry> e = cache_.get(m, [&] { return make(m); });
    return execute(*e, x, q_.output(acc, {m, n_}, false));
  }

  std::string impl(int64_t m) { return cache_.get(m, [&] { return make(m); })->impl; }

 private:
  std::shared_ptr<Entry> make(int64_t m) {
    memory::desc src_md({m, k_}, dt::u8, tag::ab);
    memory::desc dst_md({m, n_}, dtype_of(q_.out_kind), tag::ab);
    memory::desc wei_user({k_, n_}, dt::s8, tag::ba);  // torch's [OUT, IN] row-major is [IN, OUT] column-major
    memory::desc bias_md = q_.bias.defined() ? memory::desc({1, n_}, dt::f32, tag::ab) : memory::desc();
    dnnl::matmul::desc d(src_md, memory::desc({k_, n_}, dt::s8, tag::any), bias_md, dst_md);
    return q_.entry<dnnl::matmul>(dnnl::matmul::primitive_desc(d, q_.attr, cpu_engine()), src_md, wei_user,
                                  w_.data_ptr(), bias_md);
  }

  torch::Tensor w_;
  Quant q_;
  int64_t n_ = 0, k_ = 0;
  ShapeCache<int64_t> cache_;
};

// The add's inner loop in strict float32 (built with -ffp-contract=off: no fused multiply-add): AVX-512 or AVX2
// where the CPU has them (the same IEEE operations 16 / 8 lanes at a time; cvtps rounds half to even under the
// default MXCSR mode), scalar for the tail and elsewhere (round half to even of |v| < 2^22 by adding and
// subtracting 1.5 * 2^23; without -ffast-math the compiler keeps both).
#if defined(__x86_64__) || defined(_M_X64)
#define QT_X86 1
#endif
static inline uint8_t add_one(uint8_t a, uint8_t b, float za, float sa, float zb, float sb, float inv, float vlo, float vhi, float zo) {
  const float x = (static_cast<float>(a) - za) * sa;
  const float y = (static_cast<float>(b) - zb) * sb;
  float v = (x + y) * inv;
  v = v < vlo ? vlo : (v > vhi ? vhi : v);
  const float r = (v + 12582912.0f) - 12582912.0f;
  return static_cast<uint8_t>(static_cast<int32_t>(r + zo));
}
#ifdef QT_X86
__attribute__((target("avx512f"))) static int64_t add_avx512(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, float za, float sa, float zb, float sb, float inv, float vlo, float vhi, float zo) {
  const __m512 vza = _mm512_set1_ps(za), vsa = _mm512_set1_ps(sa), vzb = _mm512_set1_ps(zb), vsb = _mm512_set1_ps(sb);
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(vlo), hi = _mm512_set1_ps(vhi);
  const __m512i izo = _mm512_set1_epi32(static_cast<int32_t>(zo));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))));
    __m512 y = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i))));
    x = _mm512_mul_ps(_mm512_sub_ps(x, vza), vsa);
    y = _mm512_mul_ps(_mm512_sub_ps(y, vzb), vsb);
    __m512 v = _mm512_mul_ps(_mm512_add_ps(x, y), vinv);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(v), izo);  // round half to even (MXCSR default)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtusepi32_epi8(c));
  }
  return i;
}
__attribute__((target("avx2"))) static int64_t add_avx2(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, float za, float sa, float zb, float sb, float inv, float vlo, float vhi, float zo) {
  const __m256 vza = _mm256_set1_ps(za), vsa = _mm256_set1_ps(sa), vzb = _mm256_set1_ps(zb), vsb = _mm256_set1_ps(sb);
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(vlo), hi = _mm256_set1_ps(vhi);
  const __m256i izo = _mm256_set1_epi32(static_cast<int32_t>(zo));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + i))));
    __m256 y = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + i))));
    x = _mm256_mul_ps(_mm256_sub_ps(x, vza), vsa);
    y = _mm256_mul_ps(_mm256_sub_ps(y, vzb), vsb);
    __m256 v = _mm256_mul_ps(_mm256_add_ps(x, y), vinv);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(v), izo);
    __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(c16, c16));
  }
  return i;
}
// The widest vector path the add may use: the CPU's, lowered by ONEDNN_MAX_CPU_ISA as for oneDNN's kernels
// (AVX2 / AVX / SSE41: AVX2 or scalar), so a capped run tests the narrower paths too.  2: AVX-512, 1: AVX2, 0: scalar.
int add_isa() {
  static const int isa = [] {
    int best = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (cap != nullptr && *cap != '\0') {
      std::string c(cap);
      for (auto& ch : c) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      if (c.rfind("AVX512", 0) != 0 && c != "ALL") best = std::min(best, c.rfind("AVX2", 0) == 0 ? 1 : 0);
    }
    return best;
  }();
  return isa;
}
#endif

void add_u8_loop(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, float za, float sa, float zb, float sb, float inv, float zo, float lo, float hi) {
  const float vlo = lo - zo, vhi = hi - zo;
  int64_t i = 0;
#ifdef QT_X86
  const int isa = add_isa();
  if (isa == 2) i = add_avx512(a, b, out, n, za, sa, zb, sb, inv, vlo, vhi, zo);
  else if (isa == 1) i = add_avx2(a, b, out, n, za, sa, zb, sb, inv, vlo, vhi, zo);
#endif
  for (; i < n; ++i) out[i] = add_one(a[i], b[i], za, sa, zb, sb, inv, vlo, vhi, zo);
}

torch::Tensor add_u8(const torch::Tensor& qa, const torch::Tensor& qb, int64_t za, double sa, int64_t zb, double sb,
                     double so, int64_t zo, int64_t lo, int64_t hi, const c10::optional<torch::Tensor>& out_opt) {
  TORCH_CHECK(qa.scalar_type() == at::kByte && qb.scalar_type() == at::kByte, "qtoolkit add_u8: operands must be uint8");
  TORCH_CHECK(qa.sizes() == qb.sizes(), "qtoolkit add_u8: operand shapes differ: ", qa.sizes(), " vs ", qb.sizes());
  TORCH_CHECK(qa.device().is_cpu() && qb.device().is_cpu(), "qtoolkit add_u8: operands must be on the CPU");
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= 255, "qtoolkit add_u8: need 0 <= lo <= hi <= 255");
  const bool cl = qa.dim() == 4 && !qa.is_contiguous() && qa.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const torch::Tensor a = qa.is_contiguous(fmt) ? qa : qa.contiguous(fmt);
  const torch::Tensor b = qb.is_contiguous(fmt) ? qb : qb.contiguous(fmt);
  torch::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    TORCH_CHECK(out.scalar_type() == at::kByte && out.sizes() == qa.sizes() && out.is_contiguous(fmt),
                "qtoolkit add_u8: out must be a uint8 tensor of the operands' shape and memory format");
  } else {
    out = torch::empty_like(a, a.options(), fmt);
  }
  // float32 parameters as the fake-quant model holds them; 1/so evaluated in float32 as it does
  const float fsa = static_cast<float>(sa), fsb = static_cast<float>(sb);
  const float inv = 1.0f / static_cast<float>(so);
  const uint8_t* pa = a.data_ptr<uint8_t>();
  const uint8_t* pb = b.data_ptr<uint8_t>();
  uint8_t* po = out.data_ptr<uint8_t>();
  const int64_t n = a.numel();
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    add_u8_loop(pa + begin, pb + begin, po + begin, end - begin, static_cast<float>(za), fsa, static_cast<float>(zb),
                fsb, inv, static_cast<float>(zo), static_cast<float>(lo), static_cast<float>(hi));
  });
  return out;
}

std::string version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qtoolkit int8 convolution on oneDNN with cached primitives";
  m.def("version", &version);
#ifdef QT_X86
  m.def("add_isa", &add_isa);
#else
  m.def("add_isa", [] { return 0; });
#endif
  m.def("add_u8", &add_u8, pybind11::arg("qa"), pybind11::arg("qb"), pybind11::arg("za"), pybind11::arg("sa"),
        pybind11::arg("zb"), pybind11::arg("sb"), pybind11::arg("so"), pybind11::arg("zo"), pybind11::arg("lo"),
        pybind11::arg("hi"), pybind11::arg("out") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<QConv>(m, "QConv")
      .def(pybind11::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, std::vector<int64_t>,
                          std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t, int64_t, int64_t, bool, bool,
                          double, int64_t>())
      .def("run", &QConv::run, pybind11::arg("x"), pybind11::arg("acc") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("impl", &QConv::impl)
      .def("cached_shapes", &QConv::cached_shapes);
  pybind11::class_<QLinear>(m, "QLinear")
      .def(pybind11::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, int64_t, bool,
                          bool, double, int64_t>())
      .def("run", &QLinear::run, pybind11::arg("x"), pybind11::arg("acc") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("impl", &QLinear::impl);
}
