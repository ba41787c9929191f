// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// How a frozen weight is stored: views of bf16 and 8-bit-block (GGUF Q8_0) weights in place, their
// exact dequantisation, and the frozen layer's products over them one panel at a time.
#pragma once
#include <peft/config.hpp>
#include <peft/detail/checks.hpp>
#include <peft/detail/storage_gemm.hpp>
#include <peft/error.hpp>
#include <peft/io/detail/half.hpp>
#include <peft/types.hpp>
#include <peft/workspace.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  error "peft/storage.hpp reads little-endian tensors (safetensors, GGUF) on little-endian hosts"
#endif

PEFT_NAMESPACE_BEGIN

/// bfloat16 bits → float, exactly (bfloat16 is the top half of a float; NaN payloads kept).
inline float bf16_to_float(std::uint16_t bits) noexcept {
  return io::detail::bfloat16_to_float(bits);
}

/// IEEE binary16 bits → float, exactly: subnormals, ±0, ±inf and NaN (payload kept). The
/// safetensors reader's conversion, so a Q8_0 scale and an F16 tensor decode alike.
inline float fp16_to_float(std::uint16_t bits) noexcept { return io::detail::half_to_float(bits); }

/**
 * float → IEEE binary16 bits, rounded to nearest even: overflow gives ±inf, NaN keeps its sign and
 * the top 10 bits of its payload (a payload only in the low bits becomes a quiet NaN). The exact
 * inverse of fp16_to_float on every value binary16 can hold.
 */
inline std::uint16_t float_to_fp16(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) {  // NaN
    const std::uint32_t payload = (x >> 13) & 0x3FFu;
    return static_cast<std::uint16_t>(sign | 0x7C00u | (payload ? payload : 0x200u));
  }
  if (x >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // ≥ 65520: inf
  if (x >= 0x38800000u) {  // normal in binary16 (≥ 2^-14)
    std::uint32_t h = ((x >> 23) - 112) << 10 | ((x >> 13) & 0x3FFu);
    const std::uint32_t rest = x & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves the exponent up
    return static_cast<std::uint16_t>(sign | h);
  }
  const std::uint32_t e = x >> 23;
  if (e < 102) return sign;  // below 2^-25: rounds to ±0
  // Subnormal in binary16: the value in units of 2^-24 is m >> (126 - e).
  const std::uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
  const std::uint32_t shift = 126 - e;
  std::uint32_t h = m >> shift;
  const std::uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) ++h;  // 1024 is the smallest normal: right
  return static_cast<std::uint16_t>(sign | h);
}

/// Default size of one dequantised panel of W. Each tile of dx = dy W re-packs its block of dy,
/// so small tiles cost: LoRA forward + backward at 512 tokens, d = 4096 measured 1.15-1.2x the
/// fp32 base with 256 KiB panels, 1.09-1.15x with 1 MiB and 1.00-1.07x with 2 MiB (AVX-512
/// EPYC; docs/precision.md). The panel then lives in L3, which the packing reads it from anyway.
inline constexpr Index default_panel_bytes = 2 * 1024 * 1024;

namespace detail {
/// Keeps Scalar deduced from the workspace only, so plain matrices bind to the Ref arguments.
template <typename T>
struct same_type {
  using type = T;
};
template <typename T>
using same_type_t = typename same_type<T>::type;

inline std::uint16_t load_u16(const unsigned char* p) noexcept {
  std::uint16_t v;
  std::memcpy(&v, p, sizeof v);  // borrowed bytes promise no alignment
  return v;
}
inline std::string weight_label(const char* type, std::string_view name) {
  std::string label = std::string("peft::") + type;
  if (!name.empty()) label += " '" + std::string(name) + "'";
  return label;
}
inline void check_weight_shape(const std::string& label, Index out, Index in) {
  if (out < 0 || in < 0) {
    PEFT_THROW(dimension_error(label + ": negative shape " + std::to_string(out) + "x" +
                               std::to_string(in)));
  }
}
inline void check_byte_size(const std::string& label, std::size_t size, std::size_t expected,
                            Index out, Index in, const char* layout) {
  if (size != expected) {
    PEFT_THROW(format_error(label + ": " + std::to_string(size) + " bytes, expected " +
                            std::to_string(expected) + " for a " + std::to_string(out) + "x" +
                            std::to_string(in) + " " + layout + " weight"));
  }
}
}  // namespace detail

/**
 * Read-only view of a caller-owned `[out, in]` row-major bfloat16 weight: uint16 bit patterns,
 * the top halves of floats, `ld` values apart from one row to the next (e.g. a memory-mapped BF16
 * safetensors tensor, read in place). Never a copy: the memory must outlive the view. Values are
 * read with unaligned loads in host (little-endian) order.
 */
class Bf16Weight {
 public:
  /// Views `out` rows of `in` values, `ld` apart (0: dense, `ld = in`).
  Bf16Weight(const std::uint16_t* data, Index out, Index in, Index ld = 0,
             std::string_view name = {})
      : Bf16Weight(reinterpret_cast<const unsigned char*>(data), out, in, ld, name) {}

  /// Views a dense tensor's raw bytes, checking that they hold exactly out · in bf16 values.
  static Bf16Weight from_bytes(const void* bytes, std::size_t size, Index out, Index in,
                               std::string_view name = {}) {
    const std::string label = detail::weight_label("Bf16Weight", name);
    detail::check_weight_shape(label, out, in);
    detail::check_byte_size(label, size, std::size_t(out) * std::size_t(in) * 2, out, in, "bf16");
    return Bf16Weight(static_cast<const unsigned char*>(bytes), out, in, 0, name);
  }

  Index rows() const noexcept { return out_; }
  Index cols() const noexcept { return in_; }
  /// Values between the starts of consecutive rows.
  Index ld() const noexcept { return ld_; }
  const unsigned char* bytes() const noexcept { return bytes_; }

  /// The bit pattern at (r, c).
  std::uint16_t bits(Index r, Index c) const noexcept {
    return detail::load_u16(bytes_ + 2 * (r * ld_ + c));
  }
  /// W(r, c), exactly.
  float operator()(Index r, Index c) const noexcept { return bf16_to_float(bits(r, c)); }

  /// Writes W[row0 : row0+rows, col0 : col0+cols] into `dst` (row-major, `dst_ld` apart), exactly.
  template <typename Scalar>
  void dequantize(Index row0, Index rows, Index col0, Index cols, Scalar* dst,
                  Index dst_ld) const noexcept {
    for (Index r = 0; r < rows; ++r) {
      const unsigned char* src = bytes_ + 2 * ((row0 + r) * ld_ + col0);
      Scalar* out = dst + r * dst_ld;
      for (Index c = 0; c < cols; ++c)
        out[c] = Scalar(bf16_to_float(detail::load_u16(src + 2 * c)));
    }
  }

 private:
  Bf16Weight(const unsigned char* bytes, Index out, Index in, Index ld, std::string_view name)
      : bytes_(bytes), out_(out), in_(in), ld_(ld == 0 ? in : ld) {
    const std::string label = detail::weight_label("Bf16Weight", name);
    detail::check_weight_shape(label, out, in);
    if (bytes == nullptr && out * in != 0) {
      PEFT_THROW(dimension_error(label + ": null pointer for a " + std::to_string(out) + "x" +
                                 std::to_string(in) + " weight"));
    }
    if (ld_ < in) {
      PEFT_THROW(dimension_error(label + ": leading dimension " + std::to_string(ld_) +
                                 " is smaller than in = " + std::to_string(in) + " for a " +
                                 std::to_string(out) + "x" + std::to_string(in) + " weight"));
    }
  }

  const unsigned char* bytes_;
  Index out_;
  Index in_;
  Index ld_;
};

/**
 * Writable view of the bf16 weight an adapter views, for `merge_into` / `unmerge_from` only (as
 * `Eigen::Ref<Matrix>` is for a dense weight): the mutation is visible at the call site.
 */
class Bf16WeightRef {
 public:
  Bf16WeightRef(std::uint16_t* data, Index out, Index in, Index ld = 0)
      : data_(data), out_(out), in_(in), ld_(ld == 0 ? in : ld) {
    // The same checks as the read-only view.
    (void)Bf16Weight(data, out, in, ld_);
  }
  Index rows() const noexcept { return out_; }
  Index cols() const noexcept { return in_; }
  Index ld() const noexcept { return ld_; }
  std::uint16_t* data() const noexcept { return data_; }
  /// The read-only view of the same values.
  Bf16Weight view() const { return Bf16Weight(data_, out_, in_, ld_); }

 private:
  std::uint16_t* data_;
  Index out_;
  Index in_;
  Index ld_;
};

namespace detail {
/**
 * w += alpha · left · right into a bf16 weight, rounded once per entry: ΔW is formed a panel of
 * rows at a time in Scalar (each rank-r sum rounded once, as the dense merge kernel does), added
 * to the widened weight in double (exact unless the exponents are ~29 apart) and rounded to
 * bf16 to nearest even. A naive merge rounds ΔW to bf16 first and then the sum again. Refuses
 * (numerical_error, W unchanged) when an entry of the result would not be finite.
 */
template <typename Scalar, typename Left, typename Right>
void add_low_rank_bf16(const Bf16WeightRef& w, const Eigen::MatrixBase<Left>& left,
                       const Eigen::MatrixBase<Right>& right, Scalar alpha,
                       const std::string& where) {
  const Index out = w.rows(), in = w.cols();
  const Index rows =
      std::max<Index>(1, default_panel_bytes / std::max<Index>(in * sizeof(Scalar), 1));
  RowMatrix<Scalar> delta;
  // Two passes: nothing is written unless every entry stays finite.
  for (int write = 0; write < 2; ++write) {
    for (Index r0 = 0; r0 < out; r0 += rows) {
      const Index p = std::min(rows, out - r0);
      delta.noalias() = alpha * (left.middleRows(r0, p) * right);
      for (Index i = 0; i < p; ++i) {
        std::uint16_t* row = w.data() + (r0 + i) * w.ld();
        for (Index j = 0; j < in; ++j) {
          const std::uint16_t merged =
              io::detail::double_to_bfloat16(double(bf16_to_float(row[j])) + double(delta(i, j)));
          if (write) {
            row[j] = merged;
          } else if ((merged & 0x7F80u) == 0x7F80u) {
            PEFT_THROW(numerical_error(where + ": W + ΔW is not finite in bf16 at [" +
                                       std::to_string(r0 + i) + ", " + std::to_string(j) +
                                       "] of the [" + std::to_string(out) + ", " +
                                       std::to_string(in) + "] weight; W left unchanged"));
          }
        }
      }
    }
  }
}
}  // namespace detail

/**
 * Read-only view of a caller-owned `[out, in]` weight in GGUF's Q8_0 layout: each row is in/32
 * blocks of 34 bytes, an fp16 scale d (little-endian) then 32 int8 q, W = d · q; rows follow each
 * other with no gap (a GGUF tensor's data, read in place). Never a copy.
 *
 * `in` must be a multiple of 32: GGUF itself cannot store other Q8_0 rows, so a partial block is
 * a corrupt or mislabelled tensor and is refused rather than guessed at.
 */
class BlockQ8Weight {
 public:
  static constexpr Index block_size = 32;   ///< values per block
  static constexpr Index block_bytes = 34;  ///< fp16 scale + 32 int8

  /// Bytes a `[out, in]` weight takes (in a multiple of 32).
  static constexpr std::size_t byte_size(Index out, Index in) noexcept {
    return std::size_t(out) * std::size_t(in / block_size) * std::size_t(block_bytes);
  }

  /// Views `size` bytes as `out` rows of `in` values; refuses a shape they do not match.
  BlockQ8Weight(const void* bytes, std::size_t size, Index out, Index in,
                std::string_view name = {})
      : bytes_(static_cast<const unsigned char*>(bytes)), out_(out), in_(in) {
    const std::string label = detail::weight_label("BlockQ8Weight", name);
    detail::check_weight_shape(label, out, in);
    if (in % block_size != 0) {
      PEFT_THROW(dimension_error(label + ": in = " + std::to_string(in) +
                                 " is not a multiple of the block size 32 (a " +
                                 std::to_string(out) + "x" + std::to_string(in) +
                                 " weight; Q8_0 rows hold whole blocks of 32 values)"));
    }
    detail::check_byte_size(label, size, byte_size(out, in), out, in, "Q8_0");
    if (bytes == nullptr && size != 0) {
      PEFT_THROW(dimension_error(label + ": null pointer for " + std::to_string(size) + " bytes"));
    }
  }

  Index rows() const noexcept { return out_; }
  Index cols() const noexcept { return in_; }
  const unsigned char* bytes() const noexcept { return bytes_; }
  /// Bytes from the start of one row to the next.
  Index row_bytes() const noexcept { return in_ / block_size * block_bytes; }

  /// The fp16 scale of the block holding (r, c), as bits.
  std::uint16_t scale_bits(Index r, Index c) const noexcept {
    return detail::load_u16(block(r, c / block_size));
  }
  /// The int8 quantum at (r, c).
  int quant(Index r, Index c) const noexcept {
    return to_int8(block(r, c / block_size)[2 + c % block_size]);
  }
  /// W(r, c) = d · q, exactly (an 11-bit d times an 8-bit q fits a float's 24 bits).
  float operator()(Index r, Index c) const noexcept {
    return fp16_to_float(scale_bits(r, c)) * float(quant(r, c));
  }

  /// Writes W[row0 : row0+rows, col0 : col0+cols] into `dst` (row-major, `dst_ld` apart), exactly;
  /// the range may start and end inside a block.
  template <typename Scalar>
  void dequantize(Index row0, Index rows, Index col0, Index cols, Scalar* dst,
                  Index dst_ld) const noexcept {
    const Index col_end = col0 + cols;
    for (Index r = 0; r < rows; ++r) {
      Scalar* out = dst + r * dst_ld - col0;
      for (Index c = col0; c < col_end;) {
        const Index b = c / block_size;
        const unsigned char* blk = block(row0 + r, b);
        const Scalar d = Scalar(fp16_to_float(detail::load_u16(blk)));
        const Index stop = std::min(col_end, (b + 1) * block_size);
        const unsigned char* q = blk + 2 - b * block_size;
        for (; c < stop; ++c) out[c] = d * Scalar(to_int8(q[c]));
      }
    }
  }

 private:
  static int to_int8(unsigned char u) noexcept { return int(u ^ 0x80u) - 128; }
  const unsigned char* block(Index r, Index b) const noexcept {
    return bytes_ + r * row_bytes() + b * block_bytes;
  }

  const unsigned char* bytes_;
  Index out_;
  Index in_;
};

/**
 * Writable view of a caller-owned Q8_0 weight (the same bytes and checks as BlockQ8Weight), for
 * `requantize_merge` only: the mutation is visible at the call site.
 */
class BlockQ8WeightRef {
 public:
  BlockQ8WeightRef(void* bytes, std::size_t size, Index out, Index in, std::string_view name = {})
      : bytes_(static_cast<unsigned char*>(bytes)), out_(out), in_(in) {
    (void)BlockQ8Weight(bytes, size, out, in, name);  // the same checks as the read-only view
  }
  Index rows() const noexcept { return out_; }
  Index cols() const noexcept { return in_; }
  unsigned char* bytes() const noexcept { return bytes_; }
  Index row_bytes() const noexcept {
    return in_ / BlockQ8Weight::block_size * BlockQ8Weight::block_bytes;
  }
  std::size_t size() const noexcept { return BlockQ8Weight::byte_size(out_, in_); }
  /// The read-only view of the same bytes.
  BlockQ8Weight view() const { return BlockQ8Weight(bytes_, size(), out_, in_); }

 private:
  unsigned char* bytes_;
  Index out_;
  Index in_;
};

namespace detail {
/// One Q8_0 block as GGUF's quantize_row_q8_0 forms it: d = max|w| / 127 in float, q = round(w /
/// d) half away from zero through d's reciprocal (not through fp16(d)), d stored as fp16. A
/// zero block gets d = 0 and q = 0. The caller has checked that the values are finite and that d
/// fits fp16.
inline void quantize_block_q8_0(const float* w, unsigned char* dst) noexcept {
  float amax = 0.0f;
  for (Index j = 0; j < BlockQ8Weight::block_size; ++j) amax = std::max(amax, std::abs(w[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const std::uint16_t d16 = float_to_fp16(d);
  dst[0] = static_cast<unsigned char>(d16 & 0xFFu);
  dst[1] = static_cast<unsigned char>(d16 >> 8);
  for (Index j = 0; j < BlockQ8Weight::block_size; ++j) {
    const int q = static_cast<int>(std::round(w[j] * id));
    dst[2 + j] = static_cast<unsigned char>(static_cast<signed char>(q));
  }
}
/// The reason a block of these values cannot be quantised (empty: it can): a value that is not
/// finite, or a scale max|w| / 127 beyond fp16's range.
inline std::string q8_0_block_problem(const float* w) {
  float amax = 0.0f;
  for (Index j = 0; j < BlockQ8Weight::block_size; ++j) {
    if (!std::isfinite(w[j])) return "value " + std::to_string(w[j]) + " is not finite";
    amax = std::max(amax, std::abs(w[j]));
  }
  if ((float_to_fp16(amax / 127.0f) & 0x7C00u) == 0x7C00u) {
    return "max |w| = " + std::to_string(amax) + " needs a scale beyond fp16 (max |w| <= 8.3e6)";
  }
  return {};
}
}  // namespace detail

/**
 * Quantises `n` floats (a multiple of 32) into n/32 GGUF Q8_0 blocks at `dst` (34 bytes each), as
 * llama.cpp's quantize_row_q8_0 does: per block d = max|w| / 127 stored as fp16, q = round(w/d);
 * an all-zero block gets d = 0 and q = 0. Throws dimension_error for a bad n, numerical_error
 * for a value that is not finite or a block whose scale overflows fp16; `dst` is then untouched.
 */
inline void quantize_q8_0(const float* src, Index n, unsigned char* dst) {
  constexpr Index bs = BlockQ8Weight::block_size;
  if (n < 0 || n % bs != 0) {
    PEFT_THROW(dimension_error("peft::quantize_q8_0(): n = " + std::to_string(n) +
                               " is not a non-negative multiple of the block size 32"));
  }
  for (Index b = 0; b < n / bs; ++b) {  // check all before writing anything
    const std::string problem = detail::q8_0_block_problem(src + b * bs);
    if (!problem.empty()) {
      PEFT_THROW(numerical_error("peft::quantize_q8_0(): block " + std::to_string(b) + " (values " +
                                 std::to_string(b * bs) + ".." + std::to_string(b * bs + bs - 1) +
                                 "): " + problem + "; nothing written"));
    }
  }
  for (Index b = 0; b < n / bs; ++b)
    detail::quantize_block_q8_0(src + b * bs, dst + b * BlockQ8Weight::block_bytes);
}

/**
 * Quantises a row-major float matrix `[out, in]` (in a multiple of 32) into `size` bytes at `dst`,
 * GGUF Q8_0 rows back to back (BlockQ8Weight's layout). Refuses a wrong `size` (format_error), a
 * bad `in` (dimension_error) and values quantize_q8_0 refuses (numerical_error, naming the row),
 * before writing anything.
 */
inline void quantize_q8_0(const Eigen::Ref<const RowMatrix<float>>& w, unsigned char* dst,
                          std::size_t size, std::string_view name = {}) {
  const std::string label = detail::weight_label("quantize_q8_0", name);
  const Index out = w.rows(), in = w.cols();
  if (in % BlockQ8Weight::block_size != 0) {
    PEFT_THROW(dimension_error(label + ": in = " + std::to_string(in) +
                               " is not a multiple of the block size 32 (a " + std::to_string(out) +
                               "x" + std::to_string(in) + " weight)"));
  }
  detail::check_byte_size(label, size, BlockQ8Weight::byte_size(out, in), out, in, "Q8_0");
  for (Index r = 0; r < out; ++r) {
    for (Index b = 0; b < in / BlockQ8Weight::block_size; ++b) {
      const std::string problem =
          detail::q8_0_block_problem(w.row(r).data() + b * BlockQ8Weight::block_size);
      if (!problem.empty()) {
        PEFT_THROW(numerical_error(label + ": row " + std::to_string(r) + ", block " +
                                   std::to_string(b) + " of the " + std::to_string(out) + "x" +
                                   std::to_string(in) + " weight: " + problem +
                                   "; nothing written"));
      }
    }
  }
  const Index row_bytes = in / BlockQ8Weight::block_size * BlockQ8Weight::block_bytes;
  for (Index r = 0; r < out; ++r) quantize_q8_0(w.row(r).data(), in, dst + r * row_bytes);
}

/// The matrix quantised into a new Q8_0 byte buffer (view it with BlockQ8Weight).
inline std::vector<unsigned char> quantized_q8_0(const Eigen::Ref<const RowMatrix<float>>& w,
                                                 std::string_view name = {}) {
  std::vector<unsigned char> bytes(
      w.cols() % BlockQ8Weight::block_size == 0 ? BlockQ8Weight::byte_size(w.rows(), w.cols()) : 0);
  quantize_q8_0(w, bytes.data(), bytes.size(), name);
  return bytes;
}

/**
 * What a requantising merge into a Q8_0 weight did, and the error it introduced beyond the exact
 * W + ΔW (in double): the price of storing the merged weight in 8-bit blocks.
 */
struct RequantizationReport {
  bool merged = false;           ///< false: the adapter was merged already, nothing changed
  Index blocks_requantized = 0;  ///< blocks ΔW touched, rewritten (the others keep their bytes)
  Index blocks_total = 0;        ///< blocks in W
  double max_abs_error = 0;      ///< max |W_after − (W_before + ΔW)| over W
  double rms_error = 0;          ///< root mean square of the same over all out · in entries
  double delta_norm = 0;         ///< ‖ΔW‖_F
  double error_norm = 0;         ///< ‖W_after − (W_before + ΔW)‖_F
  /// error_norm / delta_norm: how much of the adapter's update the requantisation lost (0 when
  /// ΔW = 0).
  double relative_error = 0;
};

namespace detail {
/**
 * w += alpha · left · right into a Q8_0 weight: ΔW formed a panel of rows at a time in Scalar (as
 * for bf16); each block ΔW touches (any nonzero entry) is dequantised, ΔW added in double, the sum
 * rounded to float and requantised as quantize_q8_0 does; blocks ΔW leaves at zero keep their
 * bytes. Two passes: nothing is written unless every touched block can be quantised (finite, a
 * scale within fp16), else numerical_error naming the block. Returns the error it introduced.
 */
template <typename Scalar, typename Left, typename Right>
RequantizationReport requantize_low_rank_q8(const BlockQ8WeightRef& w,
                                            const Eigen::MatrixBase<Left>& left,
                                            const Eigen::MatrixBase<Right>& right, Scalar alpha,
                                            const std::string& where) {
  constexpr Index bs = BlockQ8Weight::block_size;
  const Index out = w.rows(), in = w.cols(), blocks = in / bs;
  const BlockQ8Weight view = w.view();
  const Index rows =
      std::max<Index>(1, default_panel_bytes / std::max<Index>(in * sizeof(Scalar), 1));
  RequantizationReport report;
  report.blocks_total = out * blocks;
  RowMatrix<Scalar> delta;
  float before[bs], target[bs];
  double sum_sq_error = 0, sum_sq_delta = 0;
  for (int write = 0; write < 2; ++write) {
    for (Index r0 = 0; r0 < out; r0 += rows) {
      const Index p = std::min(rows, out - r0);
      delta.noalias() = alpha * (left.middleRows(r0, p) * right);
      for (Index i = 0; i < p; ++i) {
        const Index r = r0 + i;
        for (Index b = 0; b < blocks; ++b) {
          const auto d = delta.row(i).segment(b * bs, bs);
          if (write) sum_sq_delta += d.template cast<double>().squaredNorm();
          if ((d.array() == Scalar(0)).all()) continue;  // untouched: keep its bytes
          view.dequantize(r, 1, b * bs, bs, before, bs);
          for (Index j = 0; j < bs; ++j) target[j] = float(double(before[j]) + double(d(j)));
          if (!write) {
            const std::string problem = q8_0_block_problem(target);
            if (!problem.empty()) {
              PEFT_THROW(numerical_error(
                  where + ": W + ΔW cannot be requantised at row " + std::to_string(r) +
                  ", block " + std::to_string(b) + " of the " + std::to_string(out) + "x" +
                  std::to_string(in) + " Q8_0 weight: " + problem + "; W left unchanged"));
            }
            continue;
          }
          quantize_block_q8_0(target,
                              w.bytes() + r * w.row_bytes() + b * BlockQ8Weight::block_bytes);
          ++report.blocks_requantized;
          for (Index j = 0; j < bs; ++j) {
            const double e = double(view(r, b * bs + j)) - (double(before[j]) + double(d(j)));
            report.max_abs_error = std::max(report.max_abs_error, std::abs(e));
            sum_sq_error += e * e;
          }
        }
      }
    }
  }
  report.merged = true;
  report.delta_norm = std::sqrt(sum_sq_delta);
  report.error_norm = std::sqrt(sum_sq_error);
  report.rms_error = out * in > 0 ? std::sqrt(sum_sq_error / double(out * in)) : 0.0;
  report.relative_error = report.delta_norm > 0 ? report.error_norm / report.delta_norm : 0.0;
  return report;
}
}  // namespace detail

/// The Storage of an adapter over a dense weight of its own Scalar (a FrozenWeight): the default.
struct Dense {};

/// True for the low-precision storage views above (types with rows(), cols() and dequantize()).
template <typename T>
inline constexpr bool is_weight_storage_v =
    std::is_same_v<T, Bf16Weight> || std::is_same_v<T, BlockQ8Weight>;

/**
 * y = x Wᵀ for a low-precision W `[out, in]`: x `[n, in]`, y `[n, out]`, float or double.
 * Dequantises W one panel of rows (about `panel_bytes`) at a time into `ws` and multiplies each
 * with Eigen's GEMM; allocates nothing once `ws` is warm. Equals "dequantise all of W, then
 * `y = x Wᵀ` with Eigen" bit for bit (docs/precision.md). W is only read.
 */
template <typename Storage, typename Scalar>
void base_forward(const Storage& w,
                  const Eigen::Ref<const RowMatrix<detail::same_type_t<Scalar>>>& x,
                  Eigen::Ref<RowMatrix<detail::same_type_t<Scalar>>> y, Workspace<Scalar>& ws,
                  Index panel_bytes = default_panel_bytes) {
  static_assert(is_weight_storage_v<Storage>,
                "peft::base_forward(): the weight must be a peft::Bf16Weight or BlockQ8Weight.");
  static_assert(std::is_floating_point_v<Scalar>,
                "peft::base_forward(): activations must be float or double.");
  const detail::Operand wo{"W", w.rows(), w.cols()};
  detail::check_cols("peft::base_forward()", detail::operand("x", x), w.cols(), "in_features", wo);
  detail::check_shape("peft::base_forward()", detail::operand("y", y), x.rows(), w.rows(),
                      detail::operand("x", x), wo);
  detail::storage_forward(w, x, y, ws, panel_bytes);
}

/**
 * dx = dy W for a low-precision W `[out, in]`: dy `[n, out]`, dx `[n, in]` (overwritten). As
 * base_forward, one tile of W at a time; bit for bit "dequantise all, then Eigen's `dy W`" for
 * n ≥ 2, within a documented bound for n = 1 (docs/precision.md). W is only read.
 */
template <typename Storage, typename Scalar>
void base_input_gradient(const Storage& w,
                         const Eigen::Ref<const RowMatrix<detail::same_type_t<Scalar>>>& dy,
                         Eigen::Ref<RowMatrix<detail::same_type_t<Scalar>>> dx,
                         Workspace<Scalar>& ws, Index panel_bytes = default_panel_bytes) {
  static_assert(is_weight_storage_v<Storage>,
                "peft::base_input_gradient(): the weight must be a peft::Bf16Weight or "
                "BlockQ8Weight.");
  static_assert(std::is_floating_point_v<Scalar>,
                "peft::base_input_gradient(): activations must be float or double.");
  const detail::Operand wo{"W", w.rows(), w.cols()};
  detail::check_cols("peft::base_input_gradient()", detail::operand("dy", dy), w.rows(),
                     "out_features", wo);
  detail::check_shape("peft::base_input_gradient()", detail::operand("dx", dx), dy.rows(), w.cols(),
                      detail::operand("dy", dy), wo);
  detail::storage_input_gradient(w, dy, dx, ws, panel_bytes);
}

/// W dequantised whole into a new matrix: for tests, references and small layers only (the
/// products above never need it).
template <typename Scalar = float, typename Storage>
RowMatrix<Scalar> dequantized(const Storage& w) {
  static_assert(is_weight_storage_v<Storage>, "peft::dequantized(): not a storage view.");
  RowMatrix<Scalar> m(w.rows(), w.cols());
  w.dequantize(0, w.rows(), 0, w.cols(), m.data(), w.cols());
  return m;
}

PEFT_NAMESPACE_END
