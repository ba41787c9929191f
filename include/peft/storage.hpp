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
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  error "peft/storage.hpp reads little-endian tensors (safetensors, GGUF) on little-endian hosts"
#endif

PEFT_NAMESPACE_BEGIN

/// bfloat16 bits → float, exactly (bfloat16 is the top half of a float; NaN payloads kept).
inline float bf16_to_float(std::uint16_t bits) noexcept {
  const std::uint32_t word = std::uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

/// IEEE binary16 bits → float, exactly: subnormals, ±0, ±inf and NaN (payload kept) included.
inline float fp16_to_float(std::uint16_t bits) noexcept {
  const std::uint32_t sign = std::uint32_t(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
  const std::uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  const std::uint32_t word = exponent == 31 ? (sign | 0x7F800000u | (mantissa << 13))
                                            : (sign | ((exponent + 112) << 23) | (mantissa << 13));
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
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
