// Fused CPU kernels of the Partially Recentralization Softmax Loss.
//
// Maths (spec: docs/spec.md), per row z[0..V), target s:
//   lse = log sum_j exp(z_j)              p_j = exp(z_j - lse)
//   tau = k-th largest of {z_j : j != s}  A = {j != s : z_j > tau}, T = {j != s : z_j == tau}
//   u_j = p_j - exp(tau - lse) on A;      S = sum_A u_j,  D = sqrt(sum_A u_j^2)
//   loss = lse - z_s + b * D
//   dloss/dz_j = p_j (1 - b D) - [j == s] + b p_j g_j,
//   g_j = u_j / D on A, -(S / D) / |T| on T, 0 elsewhere (g = 0 when D == 0).
//
// Forward, one row per thread at a time, two passes:
//   pass 1 (row read from memory): online log-sum-exp (one exp per element), storing
//          each 4-vector block's lane-wise maximum; the lane-wise maxima of groups of
//          blocks, about 4(k+1) values, give a lower bound on tau (their (k+1)-th largest);
//   pass 2 (row now resident in L2): only the blocks whose stored maximum reaches
//          the bound are read again, collecting the non-target logits >= bound,
//          about k of them; tau, A, T (all ties, exactly), S and D come from those
//          candidates. No sort, no heap, no N x V scratch; the selections are
//          bisections (RowForward::kth_largest), with no branch per element.
// Backward: one streaming pass per row that rebuilds the gradient from the five row
//   statistics (lse, tau, D, S, |T|): one exp per element, no top-k indices.
// Gradient in the forward (forward_grad): both, row by row, so the backward's read
//   of the row comes from L2; the gradient may overwrite the logits (inplace_backward).
//   Without softcap, pass 1 also keeps its exponentials exp(z_j - shift) (an fp32 row in
//   L2) and the shift of each block, so the gradient pass gets p_j with one multiply by
//   exp(shift - lse) instead of an exp: the fused step's compute was two exps per logit.
// Options (spec, "Options"), each a compile-time flag so that the default kernels are
//   the code above, unchanged: softcap replaces every loaded logit by c tanh(z / c)
//   in both passes of the forward and in the backward (which also multiplies by the
//   cap's slope 1 - tanh^2); label smoothing adds one per-row sum of z to pass 1 and
//   a constant -eps/V per column to the backward; z-loss only uses lse.
// The sixth stat, `correct`, is 1 where z_s equals the row maximum (pass 1's max). The
// seventh, `entropy` H = -sum_j p_j log p_j, comes from pass 1 too: beside the online sum
// S = sum_j e_j, e_j = exp(z_j - shift), a third sum T = sum_j e_j (z_j - shift) (rescaled
// with S when the shift moves), and H = log S - T / S.
//
// Arithmetic is float32 (float64 for float64 logits). Each row is reduced by one
// thread in a fixed order, so results are bit-identical across runs and thread
// counts. Vectors are GCC/Clang vector extensions (32 bytes): the compiler emits
// AVX2 with -march=native and SSE2 pairs otherwise; intrinsics appear only for
// movemask, maxps and the float16 conversions, each with a portable fallback.
// Rows are split over torch's intra-op threads by at::parallel_for, which forks only
// because the extension is compiled with -fopenmp (prsl_kernels/cpp_kernels.py).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(__AVX__)
#define PRSL_HAVE_F16C 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX2__)
#define PRSL_HAVE_BF16_CONVERT 1
#else
#define PRSL_HAVE_BF16_CONVERT 0
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace prsl_cpu {
namespace {

// Column order of the (N, 7) row statistics: mirrors ROW_STATS in prsl_kernels/spec.py.
constexpr int64_t kNumRowStats = 7;
enum RowStat : int { kLse = 0, kTau = 1, kDist = 2, kSpreadSum = 3, kTieCount = 4, kCorrect = 5, kEntropy = 6 };

// The options (spec, "Options"), 0 meaning off.
struct Options {
  double label_smoothing = 0, z_loss = 0, softcap = 0;
};

// ---------------------------------------------------------------- vectors (32 bytes)
typedef float vfloat __attribute__((vector_size(32)));
typedef double vdouble __attribute__((vector_size(32)));
typedef int32_t vint32 __attribute__((vector_size(32)));
typedef int64_t vint64 __attribute__((vector_size(32)));
typedef uint32_t vuint32 __attribute__((vector_size(32)));
typedef uint16_t vuint16x8 __attribute__((vector_size(16)));

// The exp and the per-block bodies must inline into the row loops (GCC otherwise
// calls vexp out of line and spills the accumulators).
#define PRSL_INLINE inline __attribute__((always_inline))

template <typename V, typename T>
PRSL_INLINE V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
PRSL_INLINE void storeu(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename S>
PRSL_INLINE V splat(S x) {
  return V{} + x;
}

template <typename V>
PRSL_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// Bit i set where lane i of a comparison result is true.
PRSL_INLINE uint32_t lane_bits(vint32 mask) {
#ifdef __AVX__
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)mask));
#else
  uint32_t bits = 0;
  for (int i = 0; i < 8; ++i) bits |= static_cast<uint32_t>(mask[i] != 0) << i;
  return bits;
#endif
}

PRSL_INLINE uint32_t lane_bits(vint64 mask) {
#ifdef __AVX__
  return static_cast<uint32_t>(_mm256_movemask_pd((__m256d)mask));
#else
  uint32_t bits = 0;
  for (int i = 0; i < 4; ++i) bits |= static_cast<uint32_t>(mask[i] != 0) << i;
  return bits;
#endif
}

// max(x, lo) lane-wise, NaN kept: maxps returns its second operand when either is
// NaN. (GCC lowers the portable `lo > x ? lo : x` to a compare and a two-uop blend.)
PRSL_INLINE vfloat clamp_below(vfloat x, vfloat lo) {
#ifdef __AVX__
  return (vfloat)_mm256_max_ps((__m256)lo, (__m256)x);
#else
  return lo > x ? lo : x;
#endif
}

// 2^t for float lanes: t = n + f with n = round(t), |f| <= 1/2, then 2^f = 1 + f q(f), q a
// degree-5 near-minimax fit (relative error 2e-9 before rounding, 8e-8 measured in
// float32, as the natural-base Cody-Waite form with two more multiplies gives). Callers
// pass t = x log2(e) - s log2(e) as one FMA, so an exp costs 8 multiplies or FMAs (the
// natural-base form needed 11: the pass-1 loop is bound by the two FMA pipes) and 4
// other ops. kCoarse (16-bit logits): q of degree 3, relative error 2.9e-6, four orders
// below the logits' own rounding (2^-9 relative for bfloat16, which moves exp(z) by
// |z| 2^-9) and far below a 16-bit gradient's: two FMAs fewer.
// Domain: t <= 127, which holds for every argument here (<= 0 up to rounding, -inf, or
// NaN). t is clamped at -127, where 2^n is built as exactly +0: results below ~1e-38
// (float32 subnormals, negligible in every sum and gradient) flush to 0, and -inf logits
// get p = 0 exactly with no extra blend; the clamp is one maxps that keeps a NaN t. n is
// rounded by adding 1.5*2^23 + 127, which leaves n + 127 in the low mantissa bits of the
// sum: shifted left 23 they are 2^n's bit pattern, one integer op. A NaN t gives a NaN f
// and stays NaN. This is the inner loop of both passes.
constexpr float kLog2e = 1.44269504088896341f;
constexpr double kLn2 = 0.693147180559945309;

// kClamped: the caller has already raised t to kExp2Floor (pass 1, which reuses the raised t).
constexpr float kExp2Floor = -127.0f;  // 2^t is exactly 0 at and below it

template <bool kCoarse = false, bool kClamped = false>
PRSL_INLINE vfloat vexp2(vfloat t) {
  const float magic = 12583039.0f;  // 1.5 * 2^23 + 127
  const vfloat tc = kClamped ? t : clamp_below(t, splat<vfloat>(kExp2Floor));
  const vfloat rounded = tc + magic;
  const vfloat f = tc - (rounded - magic);
  vfloat q;
  if constexpr (kCoarse) {
    q = splat<vfloat>(9.582852945e-3f);
    q = q * f + 5.590642616e-2f;
    q = q * f + 2.402409911e-1f;
    q = q * f + 6.931241751e-1f;
  } else {
    q = splat<vfloat>(1.535336196e-4f);
    q = q * f + 1.339887502e-3f;
    q = q * f + 9.618436918e-3f;
    q = q * f + 5.550332367e-2f;
    q = q * f + 2.402264774e-1f;
    q = q * f + 6.931471825e-1f;
  }
  const vfloat y = q * f + 1.0f;
  return y * (vfloat)((vint32)rounded << 23);
}

PRSL_INLINE vfloat vexp(vfloat x) { return vexp2(x * kLog2e); }

// float64 is the accuracy path, not the fast one: libm exp per lane.
inline vdouble vexp(vdouble x) {
  vdouble y;
  for (int i = 0; i < 4; ++i) y[i] = std::exp(x[i]);
  return y;
}

// tanh for float lanes (Cephes tanhf, ~2 ulp): an odd polynomial below |x| = 0.625,
// (1 - e) / (1 + e) with e = exp(-2|x|) above (e <= 0.29: no cancellation; e flushes
// to 0 for |x| > 44, giving exactly +-1, as libm does long before). NaN stays NaN.
// Logits divided by a cap of tens are mostly below 0.625: such vectors skip the exp and
// the division (same result as the blend, lane for lane).
PRSL_INLINE vfloat vtanh(vfloat x) {
  const vfloat ax = (vfloat)((vint32)x & splat<vint32>(0x7fffffff));
  const vfloat z = x * x;
  vfloat q = splat<vfloat>(-5.70498872745e-3f);
  q = q * z + 2.06390887954e-2f;
  q = q * z - 5.37397155531e-2f;
  q = q * z + 1.33314422036e-1f;
  q = q * z - 3.33332819422e-1f;
  const vfloat small = q * z * x + x;
  const vint32 is_large = ax >= 0.625f;
  if (lane_bits(is_large) == 0) return small;
  const vint32 sign = (vint32)x & splat<vint32>(int32_t(0x80000000u));
  const vfloat e = vexp(ax * -2.0f);
  const vfloat large = (vfloat)((vint32)((1.0f - e) / (1.0f + e)) | sign);
  return is_large ? large : small;
}

inline vdouble vtanh(vdouble x) {
  vdouble y;
  for (int i = 0; i < 4; ++i) y[i] = std::tanh(x[i]);
  return y;
}

// The soft cap c tanh(z / c), written as the spec (and the reference) write it.
template <typename V, typename S>
PRSL_INLINE V softcap_lanes(V x, S c) {
  return c * vtanh(x / c);
}

// One value through the same vector code as the streaming passes (bit-identical to them).
template <typename V, typename S>
PRSL_INLINE S softcap_one(S x, S c) {
  return softcap_lanes(splat<V>(x), c)[0];
}

// The first n lanes of x, the rest -inf (a capped partial vector is padded again).
template <typename V>
PRSL_INLINE V keep_first(V x, int64_t n) {
  using S = std::remove_reference_t<decltype(x[0])>;
  V out = x;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(S)); ++i)
    if (i >= n) out[i] = -std::numeric_limits<S>::infinity();
  return out;
}

// Streaming passes prefetch one 4 KiB page ahead. Logits come from the user's
// allocation, normally on 4 KiB pages, where the hardware stream prefetcher stops
// at every page boundary; a software prefetch a page ahead starts the next page's
// TLB walk and first lines early (measured: fp32 forward 41-58 ms -> 34-36 ms at
// 2048 x 50257 on the 2-core EPYC). Callers issue one per 64-byte line.
constexpr int64_t kCacheLine = 64;
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
PRSL_INLINE void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// ---------------------------------------------------------------- loads / stores per dtype
// Each Io<scalar_t> moves one vector of acc_t lanes between memory and registers.
template <typename scalar_t>
struct Io;

// float32 and float64 are computed in their own precision: loads and stores move lanes as they are.
template <typename T, typename V>
struct NativeIo {
  using acc_t = T;
  using vec = V;
  static constexpr int W = sizeof(V) / sizeof(T);
  static vec load(const T* p) { return loadu<vec>(p); }
  static void store(T* p, vec v) { storeu(p, v); }
};

template <>
struct Io<float> : NativeIo<float, vfloat> {};

template <>
struct Io<double> : NativeIo<double, vdouble> {};

template <>
struct Io<c10::BFloat16> {
  using acc_t = float;
  using vec = vfloat;
  static constexpr int W = 8;
  // bfloat16 is the top half of a float32: widening is a shift.
  static vec load(const c10::BFloat16* p) {
    vuint32 w = __builtin_convertvector(loadu<vuint16x8>(p), vuint32) << 16;
    return (vec)w;
  }
  // Round to nearest even (as c10::BFloat16 does); NaN becomes the canonical quiet
  // NaN. Returns the 16 result bits in the low half of each lane.
  static PRSL_INLINE vuint32 round_bits(vec v) {
    const vuint32 u = (vuint32)v;
    const vuint32 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return v != v ? splat<vuint32>(0x7FC0u) : r;
  }
#if PRSL_HAVE_BF16_CONVERT
  // One instruction per 8 or 16 values instead of the six integer ops of round_bits: the
  // gradient pass of a bfloat16 row is bound by them. The same rounding (to nearest even);
  // a NaN keeps its sign (x86's default NaN is negative), and results below float32's
  // normal range flush to zero (both far below anything a gradient test can see).
  static void store(c10::BFloat16* p, vec v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), (__m128i)_mm256_cvtneps_pbh((__m256)v)); }
#else
  static void store(c10::BFloat16* p, vec v) { storeu(p, __builtin_convertvector(round_bits(v), vuint16x8)); }
#endif
#if defined(__AVX2__)
  // 16 values as two float vectors in the order unpack leaves them (columns 0-3
  // and 8-11, then 4-7 and 12-15); store16 packs them back into column order, so a
  // pass whose per-column work does not depend on the column index can use the
  // pair: one load, two unpacks, one pack, one store per 16 values.
  static PRSL_INLINE void load16(const c10::BFloat16* p, vec& a, vec& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = (vec)_mm256_unpacklo_epi16(_mm256_setzero_si256(), v);
    b = (vec)_mm256_unpackhi_epi16(_mm256_setzero_si256(), v);
  }
  static PRSL_INLINE void store16(c10::BFloat16* p, vec a, vec b) {
#if PRSL_HAVE_BF16_CONVERT
    // a's 8 values, then b's: columns 0-3, 8-11, 4-7, 12-15; one permute of 64-bit quarters.
    const __m256i halves = (__m256i)_mm256_cvtne2ps_pbh((__m256)b, (__m256)a);
    const __m256i packed = _mm256_permute4x64_epi64(halves, 0xD8);
#else
    const __m256i packed = _mm256_packus_epi32((__m256i)round_bits(a), (__m256i)round_bits(b));
#endif
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
#endif
};

template <>
struct Io<c10::Half> {
  using acc_t = float;
  using vec = vfloat;
  static constexpr int W = 8;
#ifdef PRSL_HAVE_F16C
  static vec load(const c10::Half* p) {
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (vec)f;
  }
  static void store(c10::Half* p, vec v) {
    __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
#else
  static vec load(const c10::Half* p) {
    vec v;
    for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
  static void store(c10::Half* p, vec v) {
    for (int i = 0; i < W; ++i) p[i] = static_cast<c10::Half>(v[i]);
  }
#endif
};

// Four vectors (4W values) for passes that ignore column order (sums, maxima).
// bfloat16 with AVX2 widens 16 values with two unpacks instead of zero-extends
// and shifts, leaving columns interleaved; every other dtype loads in order.
template <typename scalar_t>
PRSL_INLINE void load4_any_order(const scalar_t* p, typename Io<scalar_t>::vec (&x)[4]) {
  using IO = Io<scalar_t>;
  for (int q = 0; q < 4; ++q) x[q] = IO::load(p + q * IO::W);
}

#if defined(__AVX2__)
template <>
PRSL_INLINE void load4_any_order<c10::BFloat16>(const c10::BFloat16* p, vfloat (&x)[4]) {
  Io<c10::BFloat16>::load16(p, x[0], x[1]);
  Io<c10::BFloat16>::load16(p + 16, x[2], x[3]);
}
#endif

// Stores four vectors in the order load4_any_order loaded them.
template <typename scalar_t>
PRSL_INLINE void store4_any_order(scalar_t* p, const typename Io<scalar_t>::vec (&x)[4]) {
  using IO = Io<scalar_t>;
  for (int q = 0; q < 4; ++q) IO::store(p + q * IO::W, x[q]);
}

#if defined(__AVX2__)
template <>
PRSL_INLINE void store4_any_order<c10::BFloat16>(c10::BFloat16* p, const vfloat (&x)[4]) {
  Io<c10::BFloat16>::store16(p, x[0], x[1]);
  Io<c10::BFloat16>::store16(p + 16, x[2], x[3]);
}
#endif

// Writes the lanes of x whose bit is set, in lane order, to out[0..popcount(bits)) and
// returns their count; out must have room for a whole vector. With AVX2 one permute
// from a table of the 256 lane selections (no branch per lane: candidates are rare and
// scattered, so a loop over the bits mispredicts about once per block).
#if defined(__AVX2__)
struct LaneSelections {
  alignas(32) int32_t index[256][8];
};
constexpr LaneSelections make_lane_selections() {
  LaneSelections t{};
  for (int bits = 0; bits < 256; ++bits) {
    int c = 0;
    for (int i = 0; i < 8; ++i)
      if ((bits >> i) & 1) t.index[bits][c++] = i;
  }
  return t;
}
inline constexpr LaneSelections kLaneSelections = make_lane_selections();
#endif

PRSL_INLINE int64_t append_lanes(float* out, vfloat x, uint32_t bits) {
#if defined(__AVX2__)
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneSelections.index[bits]));
  _mm256_storeu_ps(out, _mm256_permutevar8x32_ps((__m256)x, index));
  return __builtin_popcount(bits);
#else
  int64_t n = 0;
  for (; bits != 0; bits &= bits - 1) out[n++] = x[__builtin_ctz(bits)];
  return n;
#endif
}

PRSL_INLINE int64_t append_lanes(double* out, vdouble x, uint32_t bits) {
  int64_t n = 0;
  for (; bits != 0; bits &= bits - 1) out[n++] = x[__builtin_ctz(bits)];
  return n;
}

// A partial vector: the first n lanes from p, the rest -inf (neutral for max and
// exp-sums; never above a threshold).
template <typename scalar_t>
inline typename Io<scalar_t>::vec load_partial(const scalar_t* p, int64_t n) {
  using IO = Io<scalar_t>;
  scalar_t pad[IO::W];
  const scalar_t neg_inf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
  for (int i = 0; i < IO::W; ++i) pad[i] = neg_inf;
  std::memcpy(pad, p, n * sizeof(scalar_t));
  return IO::load(pad);
}

template <typename scalar_t>
inline void store_partial(scalar_t* p, typename Io<scalar_t>::vec v, int64_t n) {
  scalar_t tmp[Io<scalar_t>::W];
  Io<scalar_t>::store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(scalar_t));
}

// ---------------------------------------------------------------- forward
// A float's bits as a signed integer that orders as the floats do (-0 just below +0; NaNs
// beyond the infinities, never used), and back.
template <typename T>
struct OrderedKey {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr I kMagnitude = std::numeric_limits<I>::max();
  static I of(T x) {
    I b;
    std::memcpy(&b, &x, sizeof(b));
    return b ^ ((b >> (8 * sizeof(I) - 1)) & kMagnitude);
  }
  static T value(int64_t key) {
    const I k = static_cast<I>(key), b = k ^ ((k >> (8 * sizeof(I) - 1)) & kMagnitude);
    T x;
    std::memcpy(&x, &b, sizeof(x));
    return x;
  }
};

// Pass 1's exponentials exp(z - m) against the running maximum m, kept as a shift s in the
// units the lanes' exp takes. float lanes work in base 2: s = fl(m log2 e) and the exp is
// vexp2(z log2e - s), one FMA for the argument; whatever s's rounding, the row's lse is
// then s ln2 + log(sum), computed in double. float64 lanes keep the natural base.
template <typename acc_t, bool kCoarse>
struct ShiftUnits;

template <bool kCoarse>
struct ShiftUnits<float, kCoarse> {
  static float of(float m) { return m * kLog2e; }
  static float rescale(float from, float to) { return std::exp2(from - to); }  // sums at `from` to `to`
  static PRSL_INLINE vfloat exp(vfloat x, float s) { return vexp2<kCoarse>(x * kLog2e - s); }
  // The same exp in two steps, for pass 1's entropy sum: its argument y = (x - shift) in the
  // lanes' units (here log2 e (x - m)), raised to the floor where the exp is exactly 0 (so a -inf
  // logit gives e y = 0, not 0 * -inf; NaN stays NaN), then the exp of that y.
  static PRSL_INLINE vfloat arg(vfloat x, float s) { return clamp_below(x * kLog2e - s, splat<vfloat>(kExp2Floor)); }
  static PRSL_INLINE vfloat exp_arg(vfloat y) { return vexp2<kCoarse, true>(y); }
  static double natural(float s) { return static_cast<double>(s) * kLn2; }
  // Entropy from S = sum e and T = sum e y (y in the lanes' units): log S - (T / S) ln 2.
  static float entropy(float sum, float t) {
    return static_cast<float>(std::log(static_cast<double>(sum)) - static_cast<double>(t) / sum * kLn2);
  }
  static float lse(float s, float sum) { return static_cast<float>(natural(s) + std::log(static_cast<double>(sum))); }
  // exp(x - c) for a row constant c (the backward's lse): c log2 e split into hi + lo, so the
  // argument is as exact as pass 1's.
  static void split(float c, float& hi, float& lo) {
    const double e = static_cast<double>(c) * (1 / kLn2);
    hi = static_cast<float>(e), lo = static_cast<float>(e - hi);
  }
  static PRSL_INLINE vfloat exp(vfloat x, float hi, float lo) { return vexp2<kCoarse>((x * kLog2e - hi) - lo); }
};

template <bool kCoarse>
struct ShiftUnits<double, kCoarse> {
  static double of(double m) { return m; }
  static double rescale(double from, double to) { return std::exp(from - to); }
  static PRSL_INLINE vdouble exp(vdouble x, double s) { return vexp(x - s); }
  // As above; exp underflows to exactly 0 below about -745 (NaN kept: NaN < floor is false).
  static PRSL_INLINE vdouble arg(vdouble x, double s) {
    const vdouble y = x - s, floor = splat<vdouble>(-2048.0);
    return y < floor ? floor : y;
  }
  static PRSL_INLINE vdouble exp_arg(vdouble y) { return vexp(y); }
  static double natural(double s) { return s; }
  static double entropy(double sum, double t) { return std::log(sum) - t / sum; }
  static double lse(double s, double sum) { return s + std::log(sum); }
  static void split(double c, double& hi, double& lo) { hi = c, lo = 0; }
  static PRSL_INLINE vdouble exp(vdouble x, double hi, double) { return vexp(x - hi); }
};

// Top-k without a sort or a heap. Split the row into S >= k+1 disjoint sets of
// columns (segments); the k+1 largest segment maxima are k+1 distinct elements, at
// most one of them the target, so at least k non-target logits are >= the
// (k+1)-th largest segment maximum `bound`, hence tau >= bound. Pass 1 (the one
// read from memory) computes the online log-sum-exp and stores each block's
// lane-wise maximum (one vector store per block: W floats per 4W logits); a segment
// is one lane of a group of consecutive blocks, its maximum that lane of the group's
// lane-wise maximum. Pass 2 (row now in L2) tests the stored block maxima against the
// bound and reads again only the few blocks that pass, keeping their non-target
// logits >= bound: every logit tied at tau is among them, and on real logits they are
// few (S = 4(k+1) segments, randn logits, V = 50257: about 8 / 24 / 116 candidates
// for k = 6 / 20 / 100, against 19 / 78 / 518 with S = k+1). tau is then the k-th
// largest candidate, and A, T, S, D come from the candidates alone: ties are counted
// exactly, however many there are.
// With fewer than k+1 segments, or at most k of them holding a finite value (a mostly
// masked vocabulary), bound is -inf and the cut drops to the lowest finite value: all
// finite non-target logits become candidates, still linear time.
// A NaN can hide another lane's value from a block maximum; a row holding one
// (lse is NaN: its loss is NaN anyway) takes the exact scan over every column.
template <typename T>
inline T hmax(const T* lanes, int n) {
  T r = lanes[0];
  for (int i = 1; i < n; ++i) r = lanes[i] > r ? lanes[i] : r;
  return r;
}

template <typename scalar_t>
struct RowForward {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using vec = typename IO::vec;
  static constexpr int W = IO::W;
  static constexpr int BLOCK = 4 * W;
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  using Units = ShiftUnits<acc_t, sizeof(scalar_t) == 2>;  // 16-bit logits: the coarse exp
  // The spacing of the logits' values' integer images (OrderedKey), widened to acc_t.
  static constexpr int64_t kValueGranule = std::is_same_v<scalar_t, c10::BFloat16> ? int64_t{1} << 16
                                           : std::is_same_v<scalar_t, c10::Half>    ? int64_t{1} << 13
                                                                                     : 1;

  // Per-task scratch, in acc_t values: candidates (V, padded to whole vectors; first the
  // groups' maxima of segment_bound) and block maxima (W per block).
  static int64_t block_max_offset(int64_t V) { return V + W; }
  static int64_t scratch_size(int64_t V) { return block_max_offset(V) + (V + BLOCK - 1) / BLOCK * W; }

  // Calls body(first_column, x0, x1, x2, x3) on each block of 4 vectors; the last
  // block is padded with -inf. Lanes may hold a block's columns in any order.
  // kCap: the vectors are soft-capped (the padding stays -inf).
  template <bool kCap = false, typename Body>
  static PRSL_INLINE void for_each_block(const scalar_t* z, int64_t V, Body&& body, acc_t cap = 0) {
    const int64_t full = V - V % BLOCK;
    for (int64_t j0 = 0; j0 < full; j0 += BLOCK) {
      prefetch_ahead(z + j0);
      if constexpr (BLOCK * sizeof(scalar_t) > kCacheLine) prefetch_ahead(z + j0 + kCacheLine / sizeof(scalar_t));
      vec x[4];
      load4_any_order(z + j0, x);
      if constexpr (kCap)
        for (int q = 0; q < 4; ++q) x[q] = softcap_lanes(x[q], cap);
      body(j0, x[0], x[1], x[2], x[3]);
    }
    if (full < V) {
      vec x[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t start = std::min(full + q * W, V);
        x[q] = load_partial(z + start, std::min<int64_t>(W, V - start));
        if constexpr (kCap) x[q] = keep_first(softcap_lanes(x[q], cap), V - start);
      }
      body(full, x[0], x[1], x[2], x[3]);
    }
  }

  // Soft-capped columns j0 .. j0 + BLOCK - 1 into vals (padding -inf); bit c set where
  // column j0 + c is >= cut.
  static PRSL_INLINE uint32_t capped_block_bits(const scalar_t* z, int64_t V, int64_t j0, acc_t cut, acc_t cap,
                                                acc_t* vals) {
    uint32_t bits = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t start = j0 + q * W;
      vec x = splat<vec>(-kInf);
      if (start < V) {
        x = start + W <= V ? IO::load(z + start) : load_partial(z + start, V - start);
        x = keep_first(softcap_lanes(x, cap), V - start);
      }
      storeu(vals + q * W, x);
      bits |= lane_bits(x >= cut) << (q * W);
    }
    return bits;
  }

  // The count of the n_vec * W values at v that are >= x.
  static PRSL_INLINE int64_t count_at_least(const acc_t* v, int64_t n_vec, acc_t x) {
    auto count = loadu<vec>(v) >= x;  // lane counts, negated (a true compare is -1)
    for (int64_t i = 1; i < n_vec; ++i) count += loadu<vec>(v + i * W) >= x;
    int64_t total = 0;
    for (int i = 0; i < W; ++i) total -= count[i];
    return total;
  }

  // The r-th largest (1 <= r <= n_vec * W) of the n_vec * W values at v, none of them NaN:
  // a bisection over the values' order-preserving integer images between the least and
  // the greatest value, each step one vector compare per W values, stopped as soon as
  // exactly r values lie at or above the lower end (about log2 of the count of values
  // steps, not 32); the answer is then the least of those r. Unlike a selection
  // (nth_element), whose branches on random data mispredict about once per element, it
  // has one branch per step.
  // granule: the values' integer images are whole multiples of it apart (2^16 for bfloat16
  // logits widened to float, 2^13 for float16): the bisection stops at that resolution.
  static acc_t kth_largest(const acc_t* v, int64_t n_vec, int64_t r, int64_t granule = 1) {
    using Key = OrderedKey<acc_t>;
    vec least = loadu<vec>(v), greatest = least;
    for (int64_t i = 1; i < n_vec; ++i) {
      const vec x = loadu<vec>(v + i * W);
      least = x < least ? x : least, greatest = vmax(greatest, x);
    }
    acc_t lo_value = least[0], hi_value = greatest[0];
    for (int i = 1; i < W; ++i) lo_value = std::min(lo_value, least[i]), hi_value = std::max(hi_value, greatest[i]);
    // at_lo = count(>= value(lo)) >= r > count(>= value(hi)). Unsigned differences: float64's
    // keys span more than int64_t.
    int64_t lo = Key::of(lo_value), hi = int64_t(Key::of(hi_value)) + 1, at_lo = n_vec * W;
    while (at_lo > r && uint64_t(hi) - uint64_t(lo) > uint64_t(granule)) {
      const int64_t mid = int64_t(uint64_t(lo) + (uint64_t(hi) - uint64_t(lo)) / 2);
      const int64_t at_mid = count_at_least(v, n_vec, Key::value(mid));
      if (at_mid >= r) lo = mid, at_lo = at_mid;
      else hi = mid;
    }
    // The least value >= value(lo): the r-th largest whether the loop stopped on at_lo == r
    // or on an interval that holds one value only (then held by several of the values).
    const acc_t cut = Key::value(lo);
    vec m = splat<vec>(kInf);
    for (int64_t i = 0; i < n_vec; ++i) {
      const vec x = loadu<vec>(v + i * W);
      m = x >= cut && x < m ? x : m;
    }
    acc_t out = m[0];
    for (int i = 1; i < W; ++i) out = std::min(out, m[i]);
    return out;
  }

  // A lower bound on tau: the (k+1)-th largest of the lane-wise maxima of groups of
  // consecutive blocks. Each (group, lane) pair is the maximum of its own columns, so
  // the k+1 largest are k+1 distinct logits, at most one of them the target: at least
  // k non-target logits are >= the bound. About 4(k+1) pairs (against k+1, the bound
  // passes a few times fewer candidates), in whole groups of `per` blocks (the last
  // takes the rest), so the loops' trip counts do not change from group to group.
  // -inf when fewer than k+1 pairs hold a finite value (a mostly masked row), or when
  // the row has fewer than k+1 pairs. seg: scratch for groups * W values.
  static acc_t segment_bound(const acc_t* block_max, int64_t blocks, int64_t k, acc_t* seg, int64_t granule) {
    const int64_t groups = std::min(blocks, (4 * (k + 1) + W - 1) / W);
    if (groups * W < k + 1) return -kInf;
    const int64_t per = blocks / groups;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t end = g + 1 < groups ? (g + 1) * per : blocks;
      // Four independent maxima: one chain would be bound by vmax's latency.
      const acc_t* first = block_max + g * per * W;
      const int64_t count = end - g * per;
      const vec m0 = loadu<vec>(first);
      vec m[4] = {m0, m0, m0, m0};
      int64_t i = 1;
      for (; i + 4 <= count; i += 4)
        for (int q = 0; q < 4; ++q) m[q] = vmax(m[q], loadu<vec>(first + (i + q) * W));
      for (; i < count; ++i) m[0] = vmax(m[0], loadu<vec>(first + i * W));
      storeu(seg + g * W, vmax(vmax(m[0], m[1]), vmax(m[2], m[3])));
    }
    return kth_largest(seg, groups, k + 1, granule);
  }

  // Computes loss and (lse, tau, D, S, |T|, correct, entropy) of one counted row. kCap: soft-cap
  // every logit first; kSmooth: also sum the (capped) row for label smoothing.
  // kKeep (forward_grad): also leave pass 1's exponentials in keep_exp (BLOCK per block, in the
  // lanes' order) and the shift they were taken against in keep_shift (one per block), so that the
  // gradient pass gets p_j = exp(z_j - shift) exp(shift - lse) with one multiply, not one exp.
  // hit_blocks (room for blocks + 1) receives the count of the blocks pass 2 read, then those
  // blocks in ascending order: every other block holds no column >= tau.
  template <bool kCap, bool kSmooth, bool kKeep = false>
  static void run(const scalar_t* z, int64_t V, int64_t target, int64_t k, double b, const Options& opt,
                  acc_t* scratch, acc_t* loss, acc_t* stats, acc_t* keep_exp,
                  acc_t* keep_shift, int64_t* hit_blocks) {
    hit_blocks[0] = 0;
    const acc_t cap = static_cast<acc_t>(opt.softcap);
    const int64_t blocks = (V + BLOCK - 1) / BLOCK;
    acc_t* cand = scratch;           // pass 2's candidates (the segment maxima before that)
    acc_t* block_max = scratch + block_max_offset(V);  // W lanes per block

    // Pass 1: online log-sum-exp, sum_j exp(z_j - shift) in 4 accumulators (exp
    // latency). The shift moves only when a block beats the running max (about
    // log V times per row on real data), so a block costs 4 exps and one compare.
    // shift stays 0 while nothing finite was seen: exp(-inf - 0) = 0, NaN stays NaN.
    // Entropy: t0 + t1 = T = sum_j e_j y_j, y_j the exp's argument (z_j - shift, in the lanes'
    // units); when the shift moves by d = old - new, T = factor (T + d S) with S the old sum.
    // A -inf logit adds 0: Units::arg raises y to where e is exactly 0 (the clamp the exp needs
    // anyway, so T costs one FMA per vector).
    acc_t run_max = -kInf, shift = 0;
    vec s0 = splat<vec>(acc_t(0)), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0;
    vec row_sum = s0;  // label smoothing: sum_j z_j
    for_each_block<kCap>(z, V, [&](int64_t j0, vec x0, vec x1, vec x2, vec x3) __attribute__((always_inline)) {
      if constexpr (kSmooth) {
        if (j0 + BLOCK <= V) {
          row_sum += (x0 + x1) + (x2 + x3);
        } else {  // the padded last block holds its columns in order
          const vec xs[4] = {x0, x1, x2, x3};
          for (int q = 0; q < 4; ++q)
            for (int i = 0; i < W; ++i)
              if (j0 + q * W + i < V) row_sum[i] += xs[q][i];
        }
      }
      const vec m = vmax(vmax(x0, x1), vmax(x2, x3));
      storeu(block_max + j0 / BLOCK * W, m);
      if (lane_bits(m > run_max) != 0) {
        acc_t lanes[W];
        std::memcpy(lanes, &m, sizeof(lanes));
        const acc_t new_max = hmax(lanes, W);
        const acc_t new_shift = Units::of(new_max);
        // Rescales the earlier terms; 0 (not exp(0 - new)) when none was finite.
        const acc_t factor = run_max == -kInf ? acc_t(0) : Units::rescale(shift, new_shift);
        // d S added lane-wise into T before the rescale (T and S lanes pair up: t0 with s0 + s1).
        const acc_t moved = run_max == -kInf ? acc_t(0) : shift - new_shift;
        t0 = (t0 + moved * (s0 + s1)) * factor, t1 = (t1 + moved * (s2 + s3)) * factor;
        s0 = s0 * factor, s1 = s1 * factor, s2 = s2 * factor, s3 = s3 * factor;
        run_max = new_max, shift = new_shift;
      }
      const vec y0 = Units::arg(x0, shift), y1 = Units::arg(x1, shift), y2 = Units::arg(x2, shift),
                y3 = Units::arg(x3, shift);
      const vec e0 = Units::exp_arg(y0), e1 = Units::exp_arg(y1), e2 = Units::exp_arg(y2), e3 = Units::exp_arg(y3);
      t0 += e0 * y0 + e1 * y1;
      t1 += e2 * y2 + e3 * y3;
      if constexpr (kKeep) {
        storeu(keep_exp + j0, e0), storeu(keep_exp + j0 + W, e1);
        storeu(keep_exp + j0 + 2 * W, e2), storeu(keep_exp + j0 + 3 * W, e3);
        // -inf, not shift, before the first finite logit: shift is 0 and these e are 0, and the
        // scale exp(0 - lse) would overflow for a very negative lse (0 * inf); exp(-inf) = 0.
        // Afterwards the scale exp(shift - lse) is at most 1 (up to rounding).
        keep_shift[j0 / BLOCK] = run_max == -kInf ? -kInf : shift;
      }
      s0 += e0, s1 += e1, s2 += e2, s3 += e3;
    }, cap);
    const vec total = (s0 + s1) + (s2 + s3);
    acc_t sum = 0;
    for (int i = 0; i < W; ++i) sum += total[i];
    const acc_t lse = Units::lse(shift, sum);
    const vec t_lanes = t0 + t1;
    acc_t t_sum = 0;
    for (int i = 0; i < W; ++i) t_sum += t_lanes[i];
    // A row of -inf only: S = 0 and lse = -inf (its loss is NaN, as torch's); the entropy is NaN
    // with it (log 0 - 0 / 0). NaN or +inf in the row: NaN, as lse.
    const acc_t entropy = Units::entropy(sum, t_sum);
    acc_t z_target = static_cast<acc_t>(z[target]);
    if constexpr (kCap) z_target = softcap_one<vec>(z_target, cap);

    acc_t tau = kInf, spread = 0, sq = 0, ties = 0;
    if (k > 0) {
      const bool exact = lse != lse;  // a NaN somewhere: block maxima may hide values
      // Uncapped 16-bit logits take few distinct float values: the selections need fewer steps.
      const int64_t granule = kCap ? 1 : kValueGranule;
      const acc_t bound = exact ? -kInf : segment_bound(block_max, blocks, k, cand, granule);
      // Pass 2: candidates >= cut (never -inf: a -inf tau is decided by the count).
      const acc_t lowest = std::numeric_limits<acc_t>::lowest();
      const acc_t cut = bound > lowest ? bound : lowest;
      int64_t n = 0;
      // The block's non-target logits >= cut onto cand[n..].
      auto collect = [&](int64_t blk) __attribute__((always_inline)) {
        const int64_t j0 = blk * BLOCK;
        if constexpr (kCap) {
          acc_t vals[BLOCK];
          for (uint32_t bits = capped_block_bits(z, V, j0, cut, cap, vals); bits != 0; bits &= bits - 1) {
            const int c = __builtin_ctz(bits);
            if (j0 + c != target) cand[n++] = vals[c];
          }
        } else {
          for (int q = 0; q < 4; ++q) {
            const int64_t start = j0 + q * W;
            if (start >= V) break;
            const vec x = start + W <= V ? IO::load(z + start) : load_partial(z + start, V - start);
            const uint64_t target_lane = static_cast<uint64_t>(target - start);
            const uint32_t bits = lane_bits(x >= cut) & ~(target_lane < W ? 1u << target_lane : 0u);
            n += append_lanes(cand + n, x, bits);
          }
        }
      };
      // First the list of blocks to read, without a branch per block. For small k four blocks'
      // maxima are tested at once (most quads hold no candidate: one compare, not four), a
      // passing quad's blocks listed without a branch. From about k = blocks / 32 on, a large
      // share of the quads pass and that branch would mispredict: every block is listed
      // branch-free.
      int64_t* listed = hit_blocks + 1;
      int64_t count = 0, blk = 0;
      if (!exact && 32 * (k + 1) <= blocks) {
        for (; blk + 4 <= blocks; blk += 4) {
          const acc_t* m = block_max + blk * W;
          const vec m0 = loadu<vec>(m), m1 = loadu<vec>(m + W), m2 = loadu<vec>(m + 2 * W), m3 = loadu<vec>(m + 3 * W);
          if (lane_bits(vmax(vmax(m0, m1), vmax(m2, m3)) >= cut) == 0) continue;
          const vec quad[4] = {m0, m1, m2, m3};
          for (int q = 0; q < 4; ++q) {
            listed[count] = blk + q;
            count += lane_bits(quad[q] >= cut) != 0;
          }
        }
      }
      for (; blk < blocks; ++blk) {
        listed[count] = blk;
        count += exact || lane_bits(loadu<vec>(block_max + blk * W) >= cut) != 0;
      }
      hit_blocks[0] = count;
      for (int64_t h = 0; h < count; ++h) collect(listed[h]);
      // -inf pads the candidates to whole vectors: never > tau, never == a finite tau (a -inf
      // tau's ties are counted apart).
      const int64_t n_vec = (n + W - 1) / W;
      std::fill(cand + n, cand + n_vec * W, -kInf);
      // Fewer than k finite non-target logits: tau = -inf and every other non-target
      // logit (all -inf, or NaN in a row whose loss is NaN anyway) ties.
      tau = n >= k ? kth_largest(cand, n_vec, k, granule) : -kInf;
      const acc_t p_min = tau == -kInf ? acc_t(0) : std::exp(tau - lse);
      acc_t lse_hi, lse_lo;
      Units::split(lse, lse_hi, lse_lo);
      vec spread_v = splat<vec>(acc_t(0)), sq_v = spread_v;
      decltype(spread_v == spread_v) tie_v{};  // lane counts of candidates == tau, negated
      for (int64_t v = 0; v < n_vec; ++v) {
        const vec c = loadu<vec>(cand + v * W);
        const vec u = c > tau ? Units::exp(c, lse_hi, lse_lo) - p_min : splat<vec>(acc_t(0));
        spread_v += u, sq_v += u * u;
        tie_v += c == tau;
      }
      int64_t tie_count = 0;
      for (int i = 0; i < W; ++i) spread += spread_v[i], sq += sq_v[i], tie_count -= tie_v[i];
      ties = static_cast<acc_t>(n >= k ? tie_count : (V - 1) - n);
    }
    const acc_t dist = std::sqrt(sq);
    acc_t ce = lse - z_target;
    if constexpr (kSmooth) {
      acc_t total_z = 0;
      for (int i = 0; i < W; ++i) total_z += row_sum[i];
      const acc_t eps = static_cast<acc_t>(opt.label_smoothing);
      ce = (1 - eps) * ce + eps * (lse - total_z / static_cast<acc_t>(V));
    }
    if (opt.z_loss != 0) ce += static_cast<acc_t>(opt.z_loss) * lse * lse;
    *loss = ce + static_cast<acc_t>(b) * dist;
    stats[kLse] = lse;
    stats[kTau] = tau;
    stats[kDist] = dist;
    stats[kSpreadSum] = spread;
    stats[kTieCount] = ties;
    stats[kCorrect] = lse == lse && z_target >= run_max ? acc_t(1) : acc_t(0);
    stats[kEntropy] = entropy;
  }
};

// Rows per task: enough columns per task that threading overhead stays small on
// tiny inputs. Rows are independent, so the split never changes a result.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "prsl_cpu: logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, "prsl_cpu: logits must be 2-D [N, V], got ", logits.dim(), " dims");
  TORCH_CHECK(logits.size(1) >= 1, "prsl_cpu: V must be >= 1");
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1,
              "prsl_cpu: logits must have unit stride along V (rows may be strided)");
}

void check_target(const at::Tensor& target, int64_t n) {
  TORCH_CHECK(target.device().is_cpu(), "prsl_cpu: target must be a CPU tensor");
  TORCH_CHECK(target.scalar_type() == at::kLong, "prsl_cpu: target must be int64");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, "prsl_cpu: target must have shape [N] = [", n, "]");
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits, const at::Tensor& target_in, int64_t k,
                                               double b, int64_t ignore_index, double label_smoothing,
                                               double z_loss, double softcap) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_target(target_in, N);
  TORCH_CHECK(k >= 0 && k <= V - 1, "prsl_cpu: k must be in [0, V-1] = [0, ", V - 1, "], got ", k);
  const at::Tensor target = target_in.contiguous();
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({N}, logits.options().dtype(acc_type));
  at::Tensor stats = at::empty({N, kNumRowStats}, logits.options().dtype(acc_type));
  if (N == 0) return {loss, stats};
  const Options opt{label_smoothing, z_loss, softcap};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "prsl_forward_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    using Row = RowForward<scalar_t>;
    // The four kernels; the default one (no cap, no smoothing) is the plain loss's.
    auto row_kernel = softcap > 0 ? (label_smoothing > 0 ? &Row::template run<true, true> : &Row::template run<true, false>)
                                  : (label_smoothing > 0 ? &Row::template run<false, true> : &Row::template run<false, false>);
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    const int64_t* t = target.const_data_ptr<int64_t>();
    acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
    acc_t* stats_ptr = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(RowForward<scalar_t>::scratch_size(V));  // per task, not per row
      std::vector<int64_t> hit_blocks((V + 4 * Io<scalar_t>::W - 1) / (4 * Io<scalar_t>::W) + 1);
      for (int64_t i = begin; i < end; ++i) {
        acc_t* row_stats = stats_ptr + i * kNumRowStats;
        const int64_t s = t[i];
        if (s == ignore_index) {
          loss_ptr[i] = 0;
          std::fill(row_stats, row_stats + kNumRowStats, acc_t(0));
          continue;
        }
        TORCH_CHECK(s >= 0 && s < V, "prsl_cpu: target ", s, " out of range [0, ", V, ") in row ", i);
        row_kernel(base + i * row_stride, V, s, k, b, opt, scratch.data(), loss_ptr + i, row_stats, nullptr, nullptr,
                   hit_blocks.data());
      }
    });
  });
  return {loss, stats};
}

// ---------------------------------------------------------------- backward
// The gradient is a fresh N x V buffer. With 4 KiB pages its first-touch page
// faults cost several times the kernel itself (measured: 430 ms vs 120 ms to fill
// 412 MB on 2 cores), so ask Linux for transparent huge pages on it before the
// first write. Advisory only: a refusal changes nothing but speed.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t first = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// kCap: soft-capped logits (the gradient through the cap is the slope 1 - tanh^2);
// kOpt: label smoothing and / or z-loss (row constants). Both false: the plain loss.
// next_row (forward_grad only): the row this thread streams next. One prefetch of it per line
// of this row: the gradient pass computes from L2 and leaves the memory bus idle, so the next
// row's first pass then finds its lines in cache, and the two passes overlap compute with traffic.
// kCached (forward_grad, no softcap): p_j from pass 1's kept exponentials (RowForward::run's
// kKeep), one multiply per column instead of an exp: two roundings instead of one, so this
// gradient differs from backward_cpu's in the last bits. Blocks that pass 2 did not read
// (hit_blocks lists those it did) hold no column >= tau: all but a few, they take p_j times
// one coefficient without reading the logits again, in runs between the listed blocks, so
// the loop has no data-dependent branch per block.
template <typename scalar_t, bool kCap, bool kOpt, bool kCached = false>
void backward_row(const scalar_t* z, scalar_t* out, int64_t V, int64_t target, typename Io<scalar_t>::acc_t grad,
                  const typename Io<scalar_t>::acc_t* st, double b_in, const Options& opt,
                  const scalar_t* next_row, const typename Io<scalar_t>::acc_t* kept_exp = nullptr,
                  const typename Io<scalar_t>::acc_t* kept_shift = nullptr, const int64_t* hit_blocks = nullptr) {
  static_assert(!(kCap && kCached), "the kept exponentials are of uncapped logits' pass: not with softcap");
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using vec = typename IO::vec;
  constexpr int W = IO::W;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t b = static_cast<acc_t>(b_in);
  const acc_t lse = st[kLse], tau = st[kTau], dist = st[kDist], spread = st[kSpreadSum],
              ties = st[kTieCount];
  acc_t keep = 1 - b * dist;  // p_j (1 - b D): every column
  const acc_t eps = static_cast<acc_t>(opt.label_smoothing), cap = static_cast<acc_t>(opt.softcap);
  if constexpr (kOpt) {
    if (opt.z_loss != 0) keep += 2 * static_cast<acc_t>(opt.z_loss) * lse;  // d(lam lse^2)/dz_j = 2 lam lse p_j
  }
  const acc_t smooth = grad * (eps / static_cast<acc_t>(V));  // -eps/V on every column
  const bool penalised = dist > 0;  // g = 0 entirely when D == 0
  // dz_j = p_j * c_j with c_j = grad * keep below tau (almost every column),
  // grad * (keep + tie_term) on T, grad * (keep + above_scale * u_j) on A.
  const acc_t above_scale = penalised ? b / dist : acc_t(0);
  const acc_t tie_term = penalised && ties > 0 ? -b * (spread / dist) / ties : acc_t(0);
  const acc_t p_min = (!penalised || tau == -inf) ? acc_t(0) : std::exp(tau - lse);
  const acc_t below_coef = grad * keep, tie_coef = grad * (keep + tie_term);
  // Read before the column loop: with out == z (the in-place gradient) the loop overwrites it.
  const acc_t z_target_raw = static_cast<acc_t>(z[target]);

  // A vector with no column at or above tau takes the short path, which computes
  // exactly what the long path computes for such columns.
  // The scale exp(shift - lse) of the kept exponentials of column j's block, recomputed only
  // when the shift moved (about log V times a row).
  constexpr int64_t kBlock = 4 * W;
  using Units = ShiftUnits<acc_t, sizeof(scalar_t) == 2>;
  acc_t lse_hi, lse_lo;
  Units::split(lse, lse_hi, lse_lo);
  // below: scale times below_coef, the whole coefficient of a block below tau (kCached).
  acc_t scale_shift = std::numeric_limits<acc_t>::quiet_NaN(), scale = 0, below = 0;
  auto scale_at = [&](int64_t col) __attribute__((always_inline)) {
    const acc_t sh = kept_shift[col / kBlock];
    if (!(sh == scale_shift)) {
      scale_shift = sh, scale = static_cast<acc_t>(std::exp(Units::natural(sh) - static_cast<double>(lse)));
      below = scale * below_coef;
    }
    return scale;
  };
  auto probs = [&](vec x, int64_t col) __attribute__((always_inline)) {
    if constexpr (kCached) {
      return loadu<vec>(kept_exp + col) * scale_at(col);
    } else {
      (void)col;
      return Units::exp(x, lse_hi, lse_lo);
    }
  };
  auto plain_grads = [&](vec x, int64_t col) __attribute__((always_inline)) {
    const vec p = probs(x, col);
    if (!penalised || lane_bits(x >= tau) == 0) return p * below_coef;
    const vec on_ties = x == tau ? splat<vec>(tie_coef) : splat<vec>(below_coef);
    const vec coef = x > tau ? grad * (keep + above_scale * (p - p_min)) : on_ties;
    return p * coef;
  };
  auto column_grads = [&](vec raw, int64_t col) __attribute__((always_inline)) {
    if constexpr (!kCap && !kOpt) {
      return plain_grads(raw, col);
    } else {
      vec slope, x = raw;
      if constexpr (kCap) {
        const vec t = vtanh(raw / cap);
        x = cap * t;
        slope = acc_t(1) - t * t;
      }
      vec dz = plain_grads(x, col);
      if constexpr (kOpt) dz = dz - smooth;
      if constexpr (kCap) dz = dz * slope;
      return dz;
    }
  };

  int64_t j = 0;
  if constexpr (kCached) {
    // Whole blocks, in pass 1's lane order (store4_any_order puts the columns back); the
    // padded last block, whose kept exponentials are in column order, is left to the loops below.
    const int64_t full = V - V % kBlock;
    constexpr int64_t kLines = kBlock * static_cast<int64_t>(sizeof(scalar_t)) / kCacheLine;
    auto prefetch_block = [&](int64_t j0) __attribute__((always_inline)) {
      for (int64_t line = 0; line < kLines; ++line) {
        const int64_t col = j0 + line * (kCacheLine / static_cast<int64_t>(sizeof(scalar_t)));
        __builtin_prefetch(reinterpret_cast<const char*>(out + col) + kPrefetchBytes, 1);
        if (next_row != nullptr) __builtin_prefetch(next_row + col, 0, 2);
      }
    };
    // Blocks below tau: dz_j = p_j grad keep = kept_j (scale grad keep).
    auto below_tau = [&](int64_t from, int64_t to) __attribute__((always_inline)) {
      for (int64_t j0 = from; j0 < to; j0 += kBlock) {
        prefetch_block(j0);
        scale_at(j0);  // sets below
        vec g[4];
        for (int q = 0; q < 4; ++q) {
          g[q] = loadu<vec>(kept_exp + j0 + q * W) * below;
          if constexpr (kOpt) g[q] = g[q] - smooth;
        }
        store4_any_order(out + j0, g);
      }
    };
    for (int64_t h = 1; h <= hit_blocks[0]; ++h) {
      const int64_t j0 = hit_blocks[h] * kBlock;
      if (j0 >= full) break;  // the padded last block: the loops below
      below_tau(j, j0);
      prefetch_block(j0);
      // A listed block: the general coefficient, blended per lane (its columns are mostly below
      // tau, and a branch per vector would mispredict).
      vec x[4], g[4];
      load4_any_order(z + j0, x);
      for (int q = 0; q < 4; ++q) {
        const vec p = probs(x[q], j0 + q * W);
        const vec on_ties = x[q] == tau ? splat<vec>(tie_coef) : splat<vec>(below_coef);
        g[q] = p * (x[q] > tau ? grad * (keep + above_scale * (p - p_min)) : on_ties);
        if constexpr (kOpt) g[q] = g[q] - smooth;
      }
      store4_any_order(out + j0, g);
      j = j0 + kBlock;
    }
    below_tau(j, full);
    j = full;
  }
#if defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && !kCached) {
    for (; j + 16 <= V; j += 16) {
      if (j % (kCacheLine / sizeof(scalar_t)) == 0) {
        prefetch_ahead(z + j);
        if (next_row != nullptr) __builtin_prefetch(next_row + j, 0, 2);
      }
      vec a, c;
      IO::load16(z + j, a, c);
      IO::store16(out + j, column_grads(a, j), column_grads(c, j + 8));
    }
  }
#endif
  for (; j + W <= V; j += W) {
    if (j % (kCacheLine / sizeof(scalar_t)) == 0) {
      prefetch_ahead(z + j);
      if (next_row != nullptr) __builtin_prefetch(next_row + j, 0, 2);
    }
    IO::store(out + j, column_grads(IO::load(z + j), j));
  }
  if (j < V) store_partial(out + j, column_grads(load_partial(z + j, V - j), j), V - j);
  // The target is in neither A nor T: only p_s (1 - b D) - 1.
  if constexpr (!kCap && !kOpt) {
    const acc_t p_s = std::exp(z_target_raw - lse);
    out[target] = static_cast<scalar_t>(grad * (p_s * keep - 1));
  } else {
    // With options: (p_s keep - (1 - eps)) - eps/V, times the cap's slope.
    acc_t z_s = z_target_raw, slope_s = 1;
    if constexpr (kCap) {
      const acc_t t = vtanh(splat<vec>(z_s / cap))[0];
      z_s = cap * t;
      slope_s = 1 - t * t;
    }
    const acc_t p_s = std::exp(z_s - lse);
    out[target] = static_cast<scalar_t>((grad * (p_s * keep - (1 - eps)) - smooth) * slope_s);
  }
}

at::Tensor backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& logits, const at::Tensor& target_in,
                        const at::Tensor& row_stats_in, double b, int64_t ignore_index, double label_smoothing,
                        double z_loss, double softcap) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_target(target_in, N);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rows_in.numel() == N && grad_rows_in.scalar_type() == acc_type,
              "prsl_cpu: grad_rows must have N elements of the stats dtype");
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == N && row_stats_in.size(1) == kNumRowStats &&
                  row_stats_in.scalar_type() == acc_type,
              "prsl_cpu: row_stats must be [N, ", kNumRowStats, "] of the stats dtype");
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const at::Tensor row_stats = row_stats_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  at::Tensor grad_logits = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad_logits;
  advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  const Options opt{label_smoothing, z_loss, softcap};
  const bool has_opt = label_smoothing != 0 || z_loss != 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "prsl_backward_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* g = grad_rows.const_data_ptr<acc_t>();
    const acc_t* st = row_stats.const_data_ptr<acc_t>();
    auto row_kernel = softcap > 0 ? (has_opt ? &backward_row<scalar_t, true, true> : &backward_row<scalar_t, true, false>)
                                  : (has_opt ? &backward_row<scalar_t, false, true> : &backward_row<scalar_t, false, false>);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* out_row = out + i * V;
        const int64_t s = t[i];
        if (s == ignore_index) {
          std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
          continue;
        }
        TORCH_CHECK(s >= 0 && s < V, "prsl_cpu: target ", s, " out of range [0, ", V, ") in row ", i);
        row_kernel(base + i * row_stride, out_row, V, s, g[i], st + i * kNumRowStats, b, opt, nullptr, nullptr,
                   nullptr, nullptr);
      }
    });
  });
  return grad_logits;
}

// ---------------------------------------------------------------- gradient in the forward
// The forward and the backward of each row back to back, by the same thread: the
// gradient pass re-reads the row from L2 (a 200 KB fp32 row was just streamed twice)
// instead of from memory, so the whole step reads the logits once from memory and
// writes the gradient once. `grad_out` may be `logits` itself (inplace_backward): every
// column is read before it is written, the target's logit before the loop. Ignored
// rows get zeros, as in backward_cpu.
std::tuple<at::Tensor, at::Tensor> forward_grad_cpu(const at::Tensor& logits, const at::Tensor& target_in,
                                                    const at::Tensor& grad_rows_in, const at::Tensor& grad_out,
                                                    int64_t k, double b, int64_t ignore_index,
                                                    double label_smoothing, double z_loss, double softcap) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_target(target_in, N);
  TORCH_CHECK(k >= 0 && k <= V - 1, "prsl_cpu: k must be in [0, V-1] = [0, ", V - 1, "], got ", k);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rows_in.numel() == N && grad_rows_in.scalar_type() == acc_type,
              "prsl_cpu: grad_rows must have N elements of the stats dtype");
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == logits.scalar_type() && grad_out.dim() == 2 &&
                  grad_out.size(0) == N && grad_out.size(1) == V && (grad_out.stride(1) == 1 || V == 1),
              "prsl_cpu: grad_out must be an [N, V] CPU tensor of the logits' dtype with unit stride along V");
  const bool same = grad_out.data_ptr() == logits.data_ptr();
  TORCH_CHECK(same ? grad_out.stride(0) == logits.stride(0)
                   : !(grad_out.data_ptr() < static_cast<const char*>(logits.data_ptr()) + logits.nbytes() &&
                       logits.data_ptr() < static_cast<const char*>(grad_out.data_ptr()) + grad_out.nbytes()),
              "prsl_cpu: grad_out must be the logits themselves or not overlap them");
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  at::Tensor loss = at::empty({N}, logits.options().dtype(acc_type));
  at::Tensor stats = at::empty({N, kNumRowStats}, logits.options().dtype(acc_type));
  if (N == 0) return {loss, stats};
  // A fresh gradient buffer: huge pages before the first touch, as backward_cpu's.
  if (!same) advise_huge_pages(grad_out.data_ptr(), grad_out.nbytes());
  const Options opt{label_smoothing, z_loss, softcap};
  const bool has_opt = label_smoothing != 0 || z_loss != 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "prsl_forward_grad_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    using Row = RowForward<scalar_t>;
    // Without softcap the gradient pass takes p from pass 1's kept exponentials (kKeep / kCached);
    // with it, the capped logits' slope needs a tanh per column anyway: the plain pair.
    auto fwd = softcap > 0 ? (label_smoothing > 0 ? &Row::template run<true, true> : &Row::template run<true, false>)
                           : (label_smoothing > 0 ? &Row::template run<false, true, true>
                                                  : &Row::template run<false, false, true>);
    auto bwd = softcap > 0 ? (has_opt ? &backward_row<scalar_t, true, true> : &backward_row<scalar_t, true, false>)
                           : (has_opt ? &backward_row<scalar_t, false, true, true>
                                      : &backward_row<scalar_t, false, false, true>);
    constexpr int64_t kBlock = 4 * Io<scalar_t>::W;
    const int64_t blocks = (V + kBlock - 1) / kBlock;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_out.mutable_data_ptr<scalar_t>();
    const int64_t in_stride = logits.stride(0), out_stride = grad_out.stride(0);
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* g = grad_rows.const_data_ptr<acc_t>();
    acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
    acc_t* stats_ptr = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(Row::scratch_size(V));
      std::vector<acc_t> kept(softcap > 0 ? 0 : blocks * kBlock + blocks);  // per task: L2-resident
      acc_t* kept_exp = kept.data();
      acc_t* kept_shift = softcap > 0 ? nullptr : kept.data() + blocks * kBlock;
      std::vector<int64_t> hit_blocks(blocks + 1);
      for (int64_t i = begin; i < end; ++i) {
        acc_t* row_stats = stats_ptr + i * kNumRowStats;
        scalar_t* out_row = out + i * out_stride;
        const int64_t s = t[i];
        if (s == ignore_index) {
          loss_ptr[i] = 0;
          std::fill(row_stats, row_stats + kNumRowStats, acc_t(0));
          std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
          continue;
        }
        TORCH_CHECK(s >= 0 && s < V, "prsl_cpu: target ", s, " out of range [0, ", V, ") in row ", i);
        const scalar_t* z = base + i * in_stride;
        fwd(z, V, s, k, b, opt, scratch.data(), loss_ptr + i, row_stats, kept_exp, kept_shift, hit_blocks.data());
        bwd(z, out_row, V, s, g[i], row_stats, b, opt, i + 1 < end ? z + in_stride : nullptr, kept_exp, kept_shift,
            hit_blocks.data());
      }
    });
  });
  return {loss, stats};
}

// What this binary was compiled with, for prsl_kernels.cpp_kernels.build_info().
// Without _OPENMP, at::parallel_for (a header template) runs on the calling thread.
std::string build_info() {
  std::string info;
#ifdef _OPENMP
  info += "openmp=1";
#else
  info += "openmp=0";
#endif
#ifdef __AVX2__
  info += ",avx2=1";
#else
  info += ",avx2=0";
#endif
#ifdef PRSL_HAVE_F16C
  info += ",f16c=1";
#else
  info += ",f16c=0";
#endif
  info += PRSL_HAVE_BF16_CONVERT ? ",avx512bf16=1" : ",avx512bf16=0";
  return info;
}

}  // namespace
}  // namespace prsl_cpu

// Private ops; prsl_kernels/cpp_kernels.py registers them as the CPU kernels of
// prsl::forward / prsl::backward.
TORCH_LIBRARY(prsl_cpu, m) {
  m.def("forward(Tensor logits, Tensor target, int k, float b, int ignore_index, float label_smoothing=0., "
        "float z_loss=0., float softcap=0.) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_rows, Tensor logits, Tensor target, Tensor row_stats, float b, "
        "int ignore_index, float label_smoothing=0., float z_loss=0., float softcap=0.) -> Tensor");
  m.def("forward_grad(Tensor logits, Tensor target, Tensor grad_rows, Tensor(a!) grad_out, int k, float b, "
        "int ignore_index, float label_smoothing=0., float z_loss=0., float softcap=0.) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &prsl_cpu::build_info);
}

TORCH_LIBRARY_IMPL(prsl_cpu, CPU, m) {
  m.impl("forward", &prsl_cpu::forward_cpu);
  m.impl("backward", &prsl_cpu::backward_cpu);
  m.impl("forward_grad", &prsl_cpu::forward_grad_cpu);
}
