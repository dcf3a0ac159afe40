// Depthwise convolution of bf16 channels_last images through AVX512_BF16's pair dot products:
// reference op F.conv2d(groups=C) in bf16, as in MobileNets (Howard et al., 2017), whose CPU
// inference runs channels_last bf16. The forward (and so the unit-stride input gradient, the
// forward of grad_output under the flipped window) and the 3x3 weight gradient (see
// dot_weight_grad_pair).
//
// Why: widened to fp32 (forward_row_nhwc_bf16) a bf16 row does one fp32 multiply-add per tap and
// two more instructions widening each input vector. vdpbf16ps does two multiply-adds at the same
// rate: each fp32 lane adds a[2i]*b[2i] + a[2i+1]*b[2i+1] of bf16 pairs. Here a pair is one
// channel at two adjacent taps of a kernel row: unpacking two pixels' lines of 32 channels
// (vpunpcklwd/vpunpckhwd) puts x[col][c] in a lane's low half and x[col + 1][c] in its high half,
// the weights hold w[kx][c] and w[kx + 1][c] the same way, and a window of KW taps is KW / 2 pair
// products and, for odd KW, one of the last tap's input unpacked with zero (so the zero weight
// beside it never meets an Inf or NaN outside the window). A run of R output pixels unpacks each
// column once for every pixel that reads it. PyTorch's bf16 channels_last kernel (oneDNN) uses
// the same instruction; widened, ours ran at 0.55-0.77x of it on the maps that stay in cache.
//
// Numerics: a product of two bf16 is exact in fp32 and each is added with one rounding, as a
// multiply-add's; the order within a pair is the instruction's, so a sum can differ from the
// widened rows' in its last fp32 bit (and the bf16 output, rarely, by one unit). vdpbf16ps treats
// denormal inputs as zero and flushes denormal results whatever MXCSR says; vcvtne2ps2bf16 rounds
// to nearest even and keeps a NaN's payload (quieted) where the widened rows write 0x7FC0.
#include "ops/cpu/depthwise_avx512/common.h"

#include <cstring>

#if FASTCNN_AVX512_PLANES
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

// A group is 32 channels, one 64-byte line of a pixel, held as two vectors of pairs: vpunpcklwd
// and vpunpckhwd of two pixels' lines interleave their words within each 128-bit lane, so the
// "low" vector's lane 4L + k holds channel 8L + k and the "high" vector's channel 8L + 4 + k.
// The weights and bias are stored in that order; one vcvtne2ps2bf16 and one vpermw put the 32
// rounded outputs back in channel order. The channel count is a multiple of 32 (see whole_lines).
constexpr int64_t kGroup = 32;
constexpr __mmask32 kAllWords = 0xFFFFFFFFu;


// Weight words of one group: [kernel row][pair][half][16 lanes]; the bias: [group][half][16].
inline int64_t pairs_per_row(int64_t kernel_w) { return (kernel_w + 1) / 2; }
inline int64_t group_words(const ImageGeometry& g) { return g.kernel_h * pairs_per_row(g.kernel_w) * 2 * kLanes; }
inline int64_t groups(const ImageGeometry& g) { return g.channels / kGroup; }

inline __m512bh as_pairs(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// Word c of a group's outputs is word channel_order[c] of vcvtne2ps2bf16(high, low).
inline __m512i channel_order() {
  alignas(64) uint16_t order[kGroup];
  for (int c = 0; c < kGroup; ++c) order[c] = static_cast<uint16_t>(c % 8 < 4 ? c / 8 * 4 + c % 4 : 16 + c / 8 * 4 + c % 4);
  return _mm512_load_si512(order);
}

// Columns ahead of a run's last that each of its kernel rows prefetches, the S*R the next run
// adds: from memory the loads waited on them (32x32x112x112, one thread: 8.1 ms without, 3.2 at
// 12 columns, 2.8 at 24 to 96; stride 2 within noise of 0 to 48 in process).
constexpr int kPrefetchColumns = 24;

// R output pixels from ox0 of the group from channel c0, of a KW-wide
// window at stride S along the row, over the kernel rows [ky0, ky1) inside the input. Columns
// outside the row load as zero where Checked.
template <int KW, int S, int R, bool Checked>
inline void dot_run(const Bf16* in, const uint32_t* words, const float* bias, Bf16* out_row, int64_t c0,
                    __m512i order, int64_t ox0, int64_t ky0, int64_t ky1, int64_t iy0,
                    const ImageGeometry& g) {
  constexpr int kPairs = KW / 2, kColumns = S * (R - 1) + KW;
  const int64_t C = g.channels, col0 = ox0 * S - g.pad_left;
  const __m512 start_low = _mm512_loadu_ps(bias + c0 / kGroup * 2 * kLanes);
  const __m512 start_high = _mm512_loadu_ps(bias + c0 / kGroup * 2 * kLanes + kLanes);
  __m512 low[R], high[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    low[r] = start_low;
    high[r] = start_high;
  }
  const __m512i zero = _mm512_setzero_si512();
  __mmask32 column_lanes[kColumns];
#pragma GCC unroll 32
  for (int j = 0; j < kColumns; ++j)
    column_lanes[j] = !Checked || static_cast<uint64_t>(col0 + j) < static_cast<uint64_t>(g.in_w) ? kAllWords : 0;
  const Bf16* row = in + (iy0 + ky0) * g.in_w * C + col0 * C + c0;
  const uint32_t* row_words = words + c0 / kGroup * group_words(g) + ky0 * pairs_per_row(KW) * 2 * kLanes;
  // Rows of at most 14 outputs prefetch only the kernel rows the group's previous output row did
  // not read (the others are in cache from it); wider rows every kernel row (in process, 2
  // threads, N=32, against every row: 14x14 and 7x7 maps 1.12-1.17x, 28x28 0.91x, 56x56 stride 2
  // 0.86x).
  const int64_t first_fetched = g.out_w <= 14 ? g.kernel_h - g.stride_h : 0;
  for (int64_t ky = ky0; ky < ky1; ++ky, row += g.in_w * C, row_words += pairs_per_row(KW) * 2 * kLanes) {
    for (int i = 0; ky >= first_fetched && i < S * R; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(row + (kColumns + kPrefetchColumns + i) * C), _MM_HINT_T0);
    // The row's weights in registers: as memory operands every multiply-add was a load too.
    __m512bh weight_low[kPairs + 1], weight_high[kPairs + 1];
#pragma GCC unroll 4
    for (int m = 0; m < kPairs + KW % 2; ++m) {
      weight_low[m] = as_pairs(_mm512_loadu_si512(row_words + m * 2 * kLanes));
      weight_high[m] = as_pairs(_mm512_loadu_si512(row_words + m * 2 * kLanes + kLanes));
    }
    const Bf16* pixel = row;
    __m512i previous = zero;
#pragma GCC unroll 32
    for (int j = 0; j < kColumns; ++j, pixel += C) {
      const __m512i column = _mm512_maskz_loadu_epi16(column_lanes[j], pixel);
      if (j > 0) {  // the pair (j - 1, j): taps 2m and 2m + 1 of the pixels r with S*r + 2m == j - 1
        const __m512bh pair_low = as_pairs(_mm512_unpacklo_epi16(previous, column));
        const __m512bh pair_high = as_pairs(_mm512_unpackhi_epi16(previous, column));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
          for (int m = 0; m < kPairs; ++m)
            if (S * r + 2 * m == j - 1) {
              low[r] = _mm512_dpbf16_ps(low[r], pair_low, weight_low[m]);
              high[r] = _mm512_dpbf16_ps(high[r], pair_high, weight_high[m]);
            }
      }
      if (KW % 2 == 1) {  // the lone last tap of the pixel r with S*r + KW - 1 == j, paired with zero
        const __m512bh lone_low = as_pairs(_mm512_unpacklo_epi16(column, zero));
        const __m512bh lone_high = as_pairs(_mm512_unpackhi_epi16(column, zero));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          if (S * r + KW - 1 == j) {
            low[r] = _mm512_dpbf16_ps(low[r], lone_low, weight_low[kPairs]);
            high[r] = _mm512_dpbf16_ps(high[r], lone_high, weight_high[kPairs]);
          }
      }
      previous = column;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high[r], low[r]));
    _mm512_storeu_si512(out_row + (ox0 + r) * C + c0, _mm512_permutexvar_epi16(order, rounded));
  }
}

// Runs of R pixels over the row; the last run ends at the row's end (some pixels made twice,
// with the same result), so out_w >= R.
template <int KW, int S, int R>
inline void dot_runs(const Bf16* in, const uint32_t* words, const float* bias, Bf16* out_row, int64_t c0,
                     __m512i order, int64_t ky0, int64_t ky1, int64_t iy0, int64_t inside_first,
                     int64_t inside_last, const ImageGeometry& g) {
  for (int64_t ox = 0; ox < g.out_w; ox += R) {
    if (ox + R > g.out_w) ox = g.out_w - R;
    if (ox >= inside_first && ox + R <= inside_last)
      dot_run<KW, S, R, false>(in, words, bias, out_row, c0, order, ox, ky0, ky1, iy0, g);
    else
      dot_run<KW, S, R, true>(in, words, bias, out_row, c0, order, ox, ky0, ky1, iy0, g);
  }
}

// Groups [group0, group1), each over output rows [oy0, oy1) in turn: runs of 7 where the row is a
// multiple of 7 (MobileNets' 112, 56, 28, 14 and 7), else of 8, of 4 on rows of 4 to 7 and one
// pixel at a time on rows of fewer.
template <int KW, int S>
void dot_block(const Bf16* in, const uint32_t* words, const float* bias, Bf16* out, int64_t oy0, int64_t oy1,
               int64_t group0, int64_t group1, const ImageGeometry& g) {
  int64_t inside_first, inside_last;
  columns_inside(g, &inside_first, &inside_last);
  const __m512i order = channel_order();
  for (int64_t group = group0; group < group1; ++group) {
    const int64_t c0 = group * kGroup;
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      int64_t ky0, ky1;
      taps_inside(oy, g.stride_h, g.pad_top, 1, g.in_h, g.kernel_h, &ky0, &ky1);
      const int64_t iy0 = oy * g.stride_h - g.pad_top;
      Bf16* out_row = out + oy * g.out_w * g.channels;
      if (g.out_w % 7 == 0)
        dot_runs<KW, S, 7>(in, words, bias, out_row, c0, order, ky0, ky1, iy0, inside_first, inside_last, g);
      else if (g.out_w >= 8)
        dot_runs<KW, S, 8>(in, words, bias, out_row, c0, order, ky0, ky1, iy0, inside_first, inside_last, g);
      else if (g.out_w >= 4)
        dot_runs<KW, S, 4>(in, words, bias, out_row, c0, order, ky0, ky1, iy0, inside_first, inside_last, g);
      else
        dot_runs<KW, S, 1>(in, words, bias, out_row, c0, order, ky0, ky1, iy0, inside_first, inside_last, g);
    }
  }
}

// The weight gradient of 3x3 windows: the sum over output pixels of grad_out times the input
// under each tap, its pairs two adjacent output pixels (ox, ox + 1): grad_out's two lines
// unpacked, and for each tap the two input columns they read (S apart) unpacked the same way, one
// pair product per tap for 2 pixels x 32 channels where the widened rows did four multiply-adds
// and four widenings. The bias gradient is the pair product with (1, 1). A row of odd width ends
// with a lone pixel, both its vectors unpacked with zero. Accumulators in the group's lane order
// (see kGroup) in `sums`: [tap][half][16], then the bias's [half][16].
constexpr int kWeightGradTaps = 9;
constexpr int64_t kWeightGradSumFloats = (kWeightGradTaps + 1) * 2 * kLanes;

template <int S, bool Checked, bool Lone>
inline void dot_weight_grad_pair(const Bf16* rows[3], const __mmask32 row_lanes[3], const Bf16* go_row, int64_t ox,
                                 __m512bh ones, __m512 low[kWeightGradTaps + 1],
                                 __m512 high[kWeightGradTaps + 1], const ImageGeometry& g) {
  constexpr int kColumns = Lone ? 3 : S + 3;  // the pixels' windows along the row
  const int64_t C = g.channels, col0 = ox * S - g.pad_left;
  const __m512i zero = _mm512_setzero_si512();
  // The columns and grad_out pixels the pair kPrefetchColumns ahead adds (as the forward's runs).
#pragma GCC unroll 3
  for (int ky = 0; ky < 3; ++ky)
#pragma GCC unroll 4
    for (int i = 0; i < 2 * S; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(rows[ky] + (col0 + 3 + kPrefetchColumns + i) * C), _MM_HINT_T0);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    _mm_prefetch(reinterpret_cast<const char*>(go_row + (ox + kPrefetchColumns / S + i) * C), _MM_HINT_T0);
  const __m512i grad_a = _mm512_loadu_si512(go_row + ox * C);
  const __m512i grad_b = Lone ? zero : _mm512_loadu_si512(go_row + (ox + 1) * C);
  const __m512bh grad_low = as_pairs(_mm512_unpacklo_epi16(grad_a, grad_b));
  const __m512bh grad_high = as_pairs(_mm512_unpackhi_epi16(grad_a, grad_b));
  low[kWeightGradTaps] = _mm512_dpbf16_ps(low[kWeightGradTaps], grad_low, ones);
  high[kWeightGradTaps] = _mm512_dpbf16_ps(high[kWeightGradTaps], grad_high, ones);
  __mmask32 column_lanes[kColumns];
#pragma GCC unroll 8
  for (int j = 0; j < kColumns; ++j) {
    const bool inside = !Checked || static_cast<uint64_t>(col0 + j) < static_cast<uint64_t>(g.in_w);
    column_lanes[j] = inside ? kAllWords : 0;
  }
#pragma GCC unroll 3
  for (int ky = 0; ky < 3; ++ky) {
    __m512i column[kColumns];
#pragma GCC unroll 8
    for (int j = 0; j < kColumns; ++j)
      column[j] = _mm512_maskz_loadu_epi16(column_lanes[j] & row_lanes[ky], rows[ky] + (col0 + j) * C);
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
      const int t = ky * 3 + kx;
      const __m512i partner = Lone ? zero : column[Lone ? 0 : kx + S];
      low[t] = _mm512_dpbf16_ps(low[t], grad_low, as_pairs(_mm512_unpacklo_epi16(column[kx], partner)));
      high[t] = _mm512_dpbf16_ps(high[t], grad_high, as_pairs(_mm512_unpackhi_epi16(column[kx], partner)));
    }
  }
}

// Output rows [oy0, oy1) of one image, the group from c0, added to `sums`.
template <int S>
void dot_weight_grad_rows(const Bf16* in, const Bf16* go, int64_t oy0, int64_t oy1, int64_t c0, float* sums,
                          const ImageGeometry& g) {
  const int64_t C = g.channels;
  const __m512bh ones = as_pairs(_mm512_set1_epi32(0x3F803F80));  // bf16 1.0 in both halves
  __m512 low[kWeightGradTaps + 1], high[kWeightGradTaps + 1];
#pragma GCC unroll 10
  for (int t = 0; t <= kWeightGradTaps; ++t) {
    low[t] = _mm512_loadu_ps(sums + t * 2 * kLanes);
    high[t] = _mm512_loadu_ps(sums + t * 2 * kLanes + kLanes);
  }
  int64_t inside_first, inside_last;
  columns_inside(g, &inside_first, &inside_last);
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const Bf16* rows[3];
    __mmask32 row_lanes[3];
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t iy = oy * g.stride_h - g.pad_top + ky;
      const bool inside = row_inside(iy, g.in_h);
      rows[ky] = in + (inside ? iy : 0) * g.in_w * C + c0;
      row_lanes[ky] = inside ? kAllWords : 0u;
    }
    const Bf16* go_row = go + oy * g.out_w * C + c0;
    int64_t ox = 0;
    for (; ox + 2 <= g.out_w; ox += 2) {
      if (ox >= inside_first && ox + 2 <= inside_last)
        dot_weight_grad_pair<S, false, false>(rows, row_lanes, go_row, ox, ones, low, high, g);
      else
        dot_weight_grad_pair<S, true, false>(rows, row_lanes, go_row, ox, ones, low, high, g);
    }
    if (ox < g.out_w) dot_weight_grad_pair<S, true, true>(rows, row_lanes, go_row, ox, ones, low, high, g);
  }
#pragma GCC unroll 10
  for (int t = 0; t <= kWeightGradTaps; ++t) {
    _mm512_storeu_ps(sums + t * 2 * kLanes, low[t]);
    _mm512_storeu_ps(sums + t * 2 * kLanes + kLanes, high[t]);
  }
}

}  // namespace

// Channel counts that are a multiple of 32 only: every group's load is then one whole line. Where
// a pixel is no whole number of lines every other group load straddled two, and the images ran
// slower than the widened rows (in process, 2 threads, bf16: 32x144x56x56 3x3 forward 3.4 -> 7.7
// ms, 32x240x28x28 1.2 -> 1.7; 5x5 forward+backward 32x120x28x28 3.7 -> 4.4).
static bool whole_lines(const ImageGeometry& g) { return g.channels % kGroup == 0; }

bool supports_nhwc_bf16_dot(const ImageGeometry& g) {
  return whole_lines(g) && g.dilation_h == 1 && g.dilation_w == 1 && (g.stride_w == 1 || g.stride_w == 2) &&
         (g.kernel_w == 3 || g.kernel_w == 5) && g.out_w >= 1;
}

int64_t nhwc_bf16_dot_weight_words(const ImageGeometry& g) { return groups(g) * group_words(g); }
int64_t nhwc_bf16_dot_bias_floats(const ImageGeometry& g) { return groups(g) * kGroup; }

void nhwc_bf16_dot_weights(const uint16_t* weight, const uint16_t* bias, const ImageGeometry& g, uint32_t* words,
                           float* bias_lanes) {
  const int64_t C = g.channels, kernel_w = g.kernel_w, taps = g.kernel_h * kernel_w, pairs = pairs_per_row(kernel_w);
  if (!bias)
    for (int64_t i = 0; i < groups(g) * kGroup; ++i) bias_lanes[i] = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    // Channel c's lane (see kGroup): 8L + 4*half + k -> lane 4L + k of that half.
    const int64_t group = c / kGroup, within = c % kGroup, half = within % 8 / 4, lane = within / 8 * 4 + within % 4;
    const uint16_t* channel = weight + c * taps;
    for (int64_t ky = 0; ky < g.kernel_h; ++ky)
      for (int64_t m = 0; m < pairs; ++m) {
        const uint32_t even = channel[ky * kernel_w + 2 * m];
        const uint32_t odd = 2 * m + 1 < kernel_w ? channel[ky * kernel_w + 2 * m + 1] : 0;
        words[group * group_words(g) + ((ky * pairs + m) * 2 + half) * kLanes + lane] = even | odd << 16;
      }
    if (bias) {
      const uint32_t bits = static_cast<uint32_t>(bias[c]) << 16;
      std::memcpy(&bias_lanes[(group * 2 + half) * kLanes + lane], &bits, sizeof bits);
    }
  }
}

int64_t nhwc_bf16_dot_groups(const ImageGeometry& g) { return groups(g); }

bool supports_nhwc_bf16_dot_weight_grad(const ImageGeometry& g) {
  return whole_lines(g) && g.kernel_h == 3 && g.kernel_w == 3 && g.dilation_h == 1 && g.dilation_w == 1 &&
         (g.stride_w == 1 || g.stride_w == 2);
}

int64_t nhwc_bf16_dot_weight_grad_floats(const ImageGeometry& g) { return groups(g) * kWeightGradSumFloats; }

void weight_grad_block_nhwc_bf16_dot(const uint16_t* in, const uint16_t* grad_out, int64_t oy0, int64_t oy1,
                                     int64_t group, const ImageGeometry& g, float* sums) {
  const Bf16* in_image = reinterpret_cast<const Bf16*>(in);
  const Bf16* go_image = reinterpret_cast<const Bf16*>(grad_out);
  float* group_sums = sums + group * kWeightGradSumFloats;
  if (g.stride_w == 1) return dot_weight_grad_rows<1>(in_image, go_image, oy0, oy1, group * kGroup, group_sums, g);
  dot_weight_grad_rows<2>(in_image, go_image, oy0, oy1, group * kGroup, group_sums, g);
}

void nhwc_bf16_dot_weight_grad_add(const float* sums, float* part, float* part_bias, const ImageGeometry& g) {
  const int64_t C = g.channels;
  // Channels 0-15 of a group: lanes 0-3 of the low half, 0-3 of the high, 4-7 low, 4-7 high;
  // channels 16-31 the same from lane 8 (see kGroup).
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t group = 0; group < groups(g); ++group) {
    const float* group_sums = sums + group * kWeightGradSumFloats;
    const int64_t c0 = group * kGroup;
    for (int t = 0; t <= kWeightGradTaps; ++t) {
      float* dst = t < kWeightGradTaps ? part + t * C + c0 : part_bias ? part_bias + c0 : nullptr;
      if (!dst) continue;
      const __m512 low = _mm512_loadu_ps(group_sums + t * 2 * kLanes);
      const __m512 high = _mm512_loadu_ps(group_sums + t * 2 * kLanes + kLanes);
      const __m512 a = _mm512_permutex2var_ps(low, first, high), b = _mm512_permutex2var_ps(low, second, high);
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), a));
      _mm512_storeu_ps(dst + kLanes, _mm512_add_ps(_mm512_loadu_ps(dst + kLanes), b));
    }
  }
}

void forward_block_nhwc_bf16_dot(const uint16_t* in_bits, const uint32_t* words, const float* bias_lanes,
                                 uint16_t* out_bits, int64_t oy0, int64_t oy1, int64_t group0, int64_t group1,
                                 const ImageGeometry& g) {
  const Bf16* in = reinterpret_cast<const Bf16*>(in_bits);
  Bf16* out = reinterpret_cast<Bf16*>(out_bits);
  if (g.kernel_w == 3 && g.stride_w == 1) return dot_block<3, 1>(in, words, bias_lanes, out, oy0, oy1, group0, group1, g);
  if (g.kernel_w == 3) return dot_block<3, 2>(in, words, bias_lanes, out, oy0, oy1, group0, group1, g);
  if (g.stride_w == 1) return dot_block<5, 1>(in, words, bias_lanes, out, oy0, oy1, group0, group1, g);
  dot_block<5, 2>(in, words, bias_lanes, out, oy0, oy1, group0, group1, g);
}

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
