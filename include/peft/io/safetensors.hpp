// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// safetensors files: a strict, bounded reader that loads only the tensors asked for, and a writer
// with F32/F64/F16/BF16 output that replaces files atomically.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/detail/atomic_file.hpp>
#include <peft/io/detail/fs.hpp>
#include <peft/io/detail/half.hpp>
#include <peft/io/detail/json.hpp>
#include <peft/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// Element types of a safetensors tensor that peft reads (and, but for F64 by default, writes).
enum class Dtype { f32, f64, f16, bf16 };

/// The safetensors spelling: "F32", "F64", "F16", "BF16".
inline const char* dtype_name(Dtype d) noexcept {
  switch (d) {
    case Dtype::f32:
      return "F32";
    case Dtype::f64:
      return "F64";
    case Dtype::f16:
      return "F16";
    case Dtype::bf16:
      return "BF16";
  }
  return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(Dtype d) noexcept {
  switch (d) {
    case Dtype::f64:
      return 8;
    case Dtype::f32:
      return 4;
    case Dtype::f16:
    case Dtype::bf16:
      return 2;
  }
  return 0;
}

/// Parses "F32", "f32", "F16", "BF16", "F64" (either case); throws config_error otherwise.
inline Dtype parse_dtype(const std::string& name) {
  std::string upper = name;
  for (char& c : upper) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  if (upper == "F32") return Dtype::f32;
  if (upper == "F64") return Dtype::f64;
  if (upper == "F16") return Dtype::f16;
  if (upper == "BF16") return Dtype::bf16;
  PEFT_THROW(config_error("unknown dtype '" + name + "' (expected f32, f64, f16 or bf16)"));
}

/// One tensor's entry in a safetensors header. `begin`/`end` are byte offsets in the data
/// section (after the header).
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  /// Number of elements (1 for a scalar of shape []).
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
  /// "[4, 16]" for messages.
  std::string shape_string() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

/// Bounds the reader enforces before it trusts anything in a file.
struct ReaderLimits {
  /// Largest accepted JSON header (the reference implementation's limit is 100 MB).
  std::uint64_t max_header_bytes = 100u << 20;
};

namespace detail {

inline std::uint64_t load_u64_le(const unsigned char* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline void store_u64_le(unsigned char* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

// Element i of a little-endian buffer of `dtype`, converted to double-free Scalar. Bytes are
// assembled by shifts, so the host's endianness does not matter (compilers fuse them to loads).
template <typename Scalar>
void decode(Dtype dtype, const unsigned char* src, std::size_t count, Scalar* dst) noexcept {
  switch (dtype) {
    case Dtype::f32:
      for (std::size_t i = 0; i < count; ++i, src += 4) {
        const std::uint32_t bits = std::uint32_t(src[0]) | std::uint32_t(src[1]) << 8 |
                                   std::uint32_t(src[2]) << 16 | std::uint32_t(src[3]) << 24;
        float f;
        std::memcpy(&f, &bits, 4);
        dst[i] = static_cast<Scalar>(f);
      }
      break;
    case Dtype::f64:
      for (std::size_t i = 0; i < count; ++i, src += 8) {
        std::uint64_t bits = 0;
        for (int b = 7; b >= 0; --b) bits = (bits << 8) | src[b];
        double d;
        std::memcpy(&d, &bits, 8);
        dst[i] = static_cast<Scalar>(d);
      }
      break;
    case Dtype::f16:
      for (std::size_t i = 0; i < count; ++i, src += 2)
        dst[i] = static_cast<Scalar>(half_to_float(std::uint16_t(src[0] | src[1] << 8)));
      break;
    case Dtype::bf16:
      for (std::size_t i = 0; i < count; ++i, src += 2)
        dst[i] = static_cast<Scalar>(bfloat16_to_float(std::uint16_t(src[0] | src[1] << 8)));
      break;
  }
}

template <typename Scalar>
void encode(Dtype dtype, const Scalar* src, std::size_t count, unsigned char* dst) noexcept {
  switch (dtype) {
    case Dtype::f32:
      for (std::size_t i = 0; i < count; ++i, dst += 4) {
        const float f = static_cast<float>(src[i]);
        std::uint32_t bits;
        std::memcpy(&bits, &f, 4);
        for (int b = 0; b < 4; ++b) dst[b] = static_cast<unsigned char>(bits >> (8 * b));
      }
      break;
    case Dtype::f64:
      for (std::size_t i = 0; i < count; ++i, dst += 8) {
        const double d = static_cast<double>(src[i]);
        std::uint64_t bits;
        std::memcpy(&bits, &d, 8);
        for (int b = 0; b < 8; ++b) dst[b] = static_cast<unsigned char>(bits >> (8 * b));
      }
      break;
    case Dtype::f16:
    case Dtype::bf16:
      for (std::size_t i = 0; i < count; ++i, dst += 2) {
        // Round once, from the source precision (a double is not first rounded to float).
        const std::uint16_t h = dtype == Dtype::f16
                                    ? double_to_half(static_cast<double>(src[i]))
                                    : double_to_bfloat16(static_cast<double>(src[i]));
        dst[0] = static_cast<unsigned char>(h);
        dst[1] = static_cast<unsigned char>(h >> 8);
      }
      break;
  }
}

// a * b, or false on overflow.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

}  // namespace detail

/**
 * A safetensors file opened for reading.
 *
 * The constructor reads and validates the header only: 8-byte little-endian length (bounded by
 * ReaderLimits), JSON object, known dtypes, non-negative shapes whose element count times the
 * dtype size equals the byte span without overflow, spans inside the file, not overlapping and
 * covering the data section with no byte left over (as the reference implementation checks).
 * Tensors are then read one at a time with positioned reads, so a large file costs only what is
 * asked for. Every violation is a format_error naming the file, the tensor and the fault.
 *
 * Reads are const and open their own stream, so one reader may serve several threads.
 */
class SafetensorsReader {
 public:
  explicit SafetensorsReader(std::string path, const ReaderLimits& limits = {})
      : label_(std::move(path)), path_(label_) {
    detail::require_regular_file(path_);  // a FIFO would block the open below forever
    std::ifstream in(path_, std::ios::binary | std::ios::ate);
    if (!in) PEFT_THROW(io_error(label_ + ": cannot open for reading"));
    const std::streamoff size = in.tellg();
    if (size < 0) PEFT_THROW(io_error(label_ + ": cannot determine the file size"));
    file_size_ = static_cast<std::uint64_t>(size);
    if (file_size_ < 8)
      fail("file is " + std::to_string(file_size_) +
           " bytes, shorter than the 8-byte header length");
    unsigned char prefix[8];
    in.seekg(0);
    in.read(reinterpret_cast<char*>(prefix), 8);
    if (!in) PEFT_THROW(io_error(label_ + ": cannot read the header length"));
    const std::uint64_t header_len = check_header_length(detail::load_u64_le(prefix), limits);
    std::string header(static_cast<std::size_t>(header_len), '\0');
    in.read(&header[0], static_cast<std::streamsize>(header_len));
    if (!in)
      PEFT_THROW(
          io_error(label_ + ": cannot read the " + std::to_string(header_len) + "-byte header"));
    parse_header(header);
  }

  /// Parses an in-memory file (e.g. from a network buffer or a fuzzer); `label` names it in errors.
  static SafetensorsReader from_buffer(std::string bytes, std::string label = "<buffer>",
                                       const ReaderLimits& limits = {}) {
    return SafetensorsReader(std::make_shared<const std::string>(std::move(bytes)),
                             std::move(label), limits);
  }

  /// File path (or buffer label) as given.
  const std::string& path() const noexcept { return label_; }
  /// `__metadata__` string pairs (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// Every tensor, sorted by name.
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const TensorInfo& t : tensors_) out.push_back(t.name);
    return out;
  }

  bool contains(const std::string& name) const noexcept { return find(name) != nullptr; }

  /// The entry for `name`; format_error if the file has no such tensor.
  const TensorInfo& info(const std::string& name) const {
    const TensorInfo* t = find(name);
    if (!t) fail("no tensor named '" + name + "'");
    return *t;
  }

  /// Reads all elements of `name`, converted to Scalar, in the file's (row-major) order into
  /// `dst`, which must have room for exactly `count` = numel elements.
  template <typename Scalar>
  void read(const std::string& name, Scalar* dst, std::int64_t count) const {
    const TensorInfo& t = info(name);
    if (count != t.numel()) {
      fail("tensor '" + name + "' has " + std::to_string(t.numel()) + " elements " +
           t.shape_string() + ", the destination holds " + std::to_string(count));
    }
    constexpr std::size_t chunk_elems = 1 << 14;  // bounded staging buffer for conversion
    const std::size_t esize = dtype_size(t.dtype);
    std::vector<unsigned char> staging(std::min<std::size_t>(chunk_elems, std::size_t(count)) *
                                       esize);
    std::ifstream file;
    if (!memory_) {
      file.open(path_, std::ios::binary);
      if (!file) PEFT_THROW(io_error(label_ + ": cannot reopen to read tensor '" + name + "'"));
    }
    std::uint64_t offset = data_start_ + t.begin;
    for (std::int64_t done = 0; done < count;) {
      const std::size_t n = std::min<std::size_t>(chunk_elems, std::size_t(count - done));
      const std::size_t bytes = n * esize;
      if (memory_) {
        std::memcpy(staging.data(), memory_->data() + offset, bytes);
      } else {
        file.seekg(static_cast<std::streamoff>(offset));
        file.read(reinterpret_cast<char*>(staging.data()), static_cast<std::streamsize>(bytes));
        if (static_cast<std::size_t>(file.gcount()) != bytes) {
          PEFT_THROW(io_error(label_ + ": tensor '" + name +
                              "' is cut short (file changed or truncated while open)"));
        }
      }
      detail::decode(t.dtype, staging.data(), n, dst + done);
      done += static_cast<std::int64_t>(n);
      offset += bytes;
    }
  }

  /**
   * Copies `size` bytes of tensor `name`'s data, starting `offset` bytes into it, to `dst` as
   * stored (little-endian, no conversion): for passing tensors through unchanged, or viewing a
   * BF16 tensor in place, a slice at a time.
   */
  void read_bytes(const std::string& name, std::uint64_t offset, void* dst,
                  std::size_t size) const {
    const TensorInfo& t = info(name);
    if (offset > t.end - t.begin || size > t.end - t.begin - offset) {
      fail("tensor '" + name + "': bytes [" + std::to_string(offset) + ", +" +
           std::to_string(size) + ") are outside its " + std::to_string(t.end - t.begin) +
           " bytes");
    }
    const std::uint64_t at = data_start_ + t.begin + offset;
    if (memory_) {
      if (size) std::memcpy(dst, memory_->data() + at, size);
      return;
    }
    std::ifstream file(path_, std::ios::binary);
    if (!file) PEFT_THROW(io_error(label_ + ": cannot reopen to read tensor '" + name + "'"));
    file.seekg(static_cast<std::streamoff>(at));
    file.read(static_cast<char*>(dst), static_cast<std::streamsize>(size));
    if (static_cast<std::size_t>(file.gcount()) != size) {
      PEFT_THROW(io_error(label_ + ": tensor '" + name +
                          "' is cut short (file changed or truncated while open)"));
    }
  }

  /// A 2-D tensor `[rows, cols]` (a 1-D tensor `[n]` reads as 1 x n).
  template <typename Scalar>
  RowMatrix<Scalar> matrix(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (t.shape.size() != 2 && t.shape.size() != 1) {
      fail("tensor '" + name + "' has shape " + t.shape_string() + ", expected a matrix");
    }
    const Index rows = t.shape.size() == 2 ? Index(t.shape[0]) : 1;
    const Index cols = Index(t.shape.back());
    RowMatrix<Scalar> m(rows, cols);
    read(name, m.data(), t.numel());
    return m;
  }

  /// A tensor with a single non-trivial dimension ([n], [n, 1] or [1, n]) as a vector.
  template <typename Scalar>
  Vector<Scalar> vector(const std::string& name) const {
    const TensorInfo& t = info(name);
    int non_unit = 0;
    for (std::int64_t d : t.shape) non_unit += d != 1;
    if (t.shape.empty() || t.shape.size() > 2 || non_unit > 1) {
      fail("tensor '" + name + "' has shape " + t.shape_string() + ", expected a vector");
    }
    Vector<Scalar> v(Index(t.numel()));
    read(name, v.data(), t.numel());
    return v;
  }

 private:
  SafetensorsReader(std::shared_ptr<const std::string> bytes, std::string label,
                    const ReaderLimits& limits)
      : label_(std::move(label)), memory_(std::move(bytes)) {
    file_size_ = memory_->size();
    if (file_size_ < 8)
      fail("buffer is " + std::to_string(file_size_) +
           " bytes, shorter than the 8-byte header length");
    const std::uint64_t header_len = check_header_length(
        detail::load_u64_le(reinterpret_cast<const unsigned char*>(memory_->data())), limits);
    parse_header(memory_->substr(8, static_cast<std::size_t>(header_len)));
  }

  // Names from the file may hold NUL or newlines: the message escapes them.
  [[noreturn]] void fail(const std::string& what) const {
    PEFT_THROW(format_error(label_ + ": " + detail::printable(what)));
  }

  std::uint64_t check_header_length(std::uint64_t n, const ReaderLimits& limits) const {
    if (n > limits.max_header_bytes) {
      fail("header length " + std::to_string(n) + " exceeds the limit of " +
           std::to_string(limits.max_header_bytes) + " bytes");
    }
    if (n > file_size_ - 8) {
      fail("header length " + std::to_string(n) + " runs past the end of the file (" +
           std::to_string(file_size_) + " bytes)");
    }
    return n;
  }

  const TensorInfo* find(const std::string& name) const noexcept {
    auto it =
        std::lower_bound(tensors_.begin(), tensors_.end(), name,
                         [](const TensorInfo& t, const std::string& n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
  }

  // A header value quoted in a message: scalars and short flat arrays as written, anything else
  // summarised. nlohmann's dump() recurses, so dumping a hostile value nested a million deep
  // overflows the stack, and a huge one would make a huge message.
  static std::string brief(const nlohmann::json& v) {
    if (v.is_object()) return "(an object)";
    if (v.is_array()) {
      bool flat = v.size() <= 16;
      for (std::size_t i = 0; flat && i < v.size(); ++i) flat = !v[i].is_structured();
      if (!flat) return "(an array of " + std::to_string(v.size()) + " entries)";
    }
    std::string s = v.dump();
    return s.size() <= 200 ? s : s.substr(0, 200) + "...";
  }

  static std::uint64_t as_u64(const nlohmann::json& v, bool& ok) {
    if (v.is_number_unsigned()) return v.get<std::uint64_t>();
    if (v.is_number_integer() && v.get<std::int64_t>() >= 0)
      return std::uint64_t(v.get<std::int64_t>());
    ok = false;
    return 0;
  }

  void parse_header(const std::string& text) {
    data_start_ = 8 + text.size();
    const std::uint64_t data_size = file_size_ - data_start_;
    // Duplicate names are refused: the reference reader keeps one of them, another reader might
    // keep the other, and the two would load different adapters from the same bytes.
    const nlohmann::json header = detail::parse_json_strict(
        text, detail::printable(label_) + ": header", detail::JsonLimits{});
    if (!header.is_object()) fail("header is not a JSON object");
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& key = it.key();
      const nlohmann::json& v = it.value();
      if (key == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ value '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(key, v, data_size));
    }
    std::sort(tensors_.begin(), tensors_.end(),
              [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
    // Overlap check on the spans sorted by start; empty tensors take no bytes and never overlap.
    std::vector<const TensorInfo*> by_offset;
    for (const TensorInfo& t : tensors_)
      if (t.end > t.begin) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      if (by_offset[i]->begin < by_offset[i - 1]->end) {
        fail("tensors '" + by_offset[i - 1]->name + "' [" +
             std::to_string(by_offset[i - 1]->begin) + ", " +
             std::to_string(by_offset[i - 1]->end) + ") and '" + by_offset[i]->name + "' [" +
             std::to_string(by_offset[i]->begin) + ", " + std::to_string(by_offset[i]->end) +
             ") overlap");
      }
    }
    // The spans must tile the data exactly, as the reference implementation requires: bytes that
    // no tensor claims are invisible to every reader and would be dropped by any rewrite.
    std::uint64_t covered = 0;
    for (const TensorInfo* t : by_offset) {
      if (t->begin != covered)
        fail(uncovered(covered, t->begin, "before tensor '" + t->name + "'"));
      covered = t->end;
    }
    if (covered != data_size) fail(uncovered(covered, data_size, "at the end of the data"));
  }

  static std::string uncovered(std::uint64_t begin, std::uint64_t end, const std::string& where) {
    return "data bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ") " + where +
           " belong to no tensor";
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& v,
                         std::uint64_t data_size) const {
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object()) fail(where + ": entry is not an object");
    TensorInfo t;
    t.name = name;
    const auto dtype = v.find("dtype");
    if (dtype == v.end() || !dtype->is_string()) fail(where + ": missing or non-string dtype");
    const std::string d = dtype->get<std::string>();
    if (d == "F32")
      t.dtype = Dtype::f32;
    else if (d == "F64")
      t.dtype = Dtype::f64;
    else if (d == "F16")
      t.dtype = Dtype::f16;
    else if (d == "BF16")
      t.dtype = Dtype::bf16;
    else
      fail(where + ": unsupported dtype '" + d + "' (peft reads F32, F64, F16, BF16)");

    const auto shape = v.find("shape");
    if (shape == v.end() || !shape->is_array()) fail(where + ": missing or non-array shape");
    std::uint64_t bytes = dtype_size(t.dtype);
    for (const nlohmann::json& dim : *shape) {
      bool ok = true;
      const std::uint64_t n = as_u64(dim, ok);
      if (!ok) fail(where + ": shape entry " + brief(dim) + " is not a non-negative integer");
      if (n > std::uint64_t(std::numeric_limits<std::int64_t>::max()) ||
          !detail::checked_mul(bytes, n, bytes)) {
        fail(where + ": shape " + brief(*shape) + " overflows the byte count");
      }
      t.shape.push_back(static_cast<std::int64_t>(n));
    }
    const auto offsets = v.find("data_offsets");
    if (offsets == v.end() || !offsets->is_array() || offsets->size() != 2) {
      fail(where + ": data_offsets must be an array [begin, end]");
    }
    bool ok = true;
    t.begin = as_u64((*offsets)[0], ok);
    t.end = as_u64((*offsets)[1], ok);
    if (!ok) fail(where + ": data_offsets " + brief(*offsets) + " are not non-negative integers");
    if (t.end < t.begin)
      fail(where + ": data_offsets " + brief(*offsets) + " end before they begin");
    if (t.end > data_size) {
      fail(where + ": data_offsets " + brief(*offsets) + " run past the end of the data (" +
           std::to_string(data_size) + " bytes)");
    }
    if (t.end - t.begin != bytes) {
      fail(where + ": shape " + t.shape_string() + " of " + dtype_name(t.dtype) + " needs " +
           std::to_string(bytes) + " bytes, data_offsets span " + std::to_string(t.end - t.begin));
    }
    if (t.shape.size() > 8)
      fail(where + ": " + std::to_string(t.shape.size()) + " dimensions (at most 8)");
    return t;
  }

  std::string label_;
  std::string path_;                           // empty for buffers
  std::shared_ptr<const std::string> memory_;  // set for buffers
  std::uint64_t file_size_ = 0;
  std::uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

/// One tensor of a header being written: what the file says about it and how many bytes follow.
struct HeaderEntry {
  const std::string* name;
  Dtype dtype;
  const std::vector<std::int64_t>* shape;
  std::uint64_t bytes;
};

/// Length prefix + JSON header for tensors laid out in the order given, padded with spaces to a
/// multiple of 8 as the reference writer does, so the data section stays aligned. Shared by
/// SafetensorsWriter and the streaming merge, so both write the same bytes.
inline std::string safetensors_header(const std::map<std::string, std::string>& metadata,
                                      const std::vector<HeaderEntry>& entries) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const HeaderEntry& e : entries) {
    const std::uint64_t end = offset + e.bytes;
    header[*e.name] = {
        {"dtype", dtype_name(e.dtype)}, {"shape", *e.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  store_u64_le(reinterpret_cast<unsigned char*>(&out[0]), text.size());
  return out + text;
}

}  // namespace detail

/**
 * Collects tensors and writes a safetensors file.
 *
 * Tensors are converted to their file dtype when added (F32 by default; F16/BF16 round to
 * nearest even from the source precision), so the caller's matrices may change afterwards.
 * `save` writes to a temporary file in the destination's folder, flushes it to disk and renames
 * it over the destination: a failure at any point leaves the previous file untouched.
 */
class SafetensorsWriter {
 public:
  /// Adds a 2-D tensor `[rows, cols]`, written in row-major order whatever m's storage order.
  template <typename Derived>
  void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, Dtype dtype = Dtype::f32) {
    using Scalar = typename Derived::Scalar;
    const RowMatrix<Scalar> rows = m;  // row-major copy (cheap next to the encoding)
    add_raw(name, dtype, {std::int64_t(m.rows()), std::int64_t(m.cols())}, rows.data());
  }

  /// Adds a 1-D tensor `[n]`.
  template <typename Derived>
  void add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& v,
                  Dtype dtype = Dtype::f32) {
    using Scalar = typename Derived::Scalar;
    const Vector<Scalar> flat = v.reshaped();
    add_raw(name, dtype, {std::int64_t(flat.size())}, flat.data());
  }

  /// Adds a tensor of any shape from `numel(shape)` contiguous row-major elements.
  template <typename Scalar>
  void add_raw(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape,
               const Scalar* data) {
    static_assert(std::is_floating_point_v<Scalar>, "safetensors tensors are floating point here");
    if (name.empty() || name == "__metadata__") {
      PEFT_THROW(config_error("SafetensorsWriter::add(): invalid tensor name '" + name + "'"));
    }
    std::uint64_t count = 1;
    for (std::int64_t d : shape) {
      if (d < 0)
        PEFT_THROW(config_error("SafetensorsWriter::add(): negative dimension in '" + name + "'"));
      count *= std::uint64_t(d);
    }
    Entry e;
    e.dtype = dtype;
    e.shape = std::move(shape);
    e.bytes.resize(std::size_t(count) * dtype_size(dtype));
    detail::encode(dtype, data, std::size_t(count), e.bytes.data());
    entries_[name] = std::move(e);  // a re-added name replaces the earlier tensor
  }

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  std::size_t size() const noexcept { return entries_.size(); }

  /// The complete file as bytes.
  std::string serialize() const {
    std::string out = header_bytes();
    for (const auto& kv : entries_) out.append(kv.second.bytes.begin(), kv.second.bytes.end());
    return out;
  }

  /// Streams the file into `file` (the caller prepares and publishes it).
  void write_to(detail::AtomicFileWriter& file) const {
    file.write(header_bytes());
    for (const auto& kv : entries_) file.write(kv.second.bytes.data(), kv.second.bytes.size());
  }

  /// Writes the file atomically (see the class comment); io_error on failure.
  void save(const std::string& path) const {
    detail::AtomicFileWriter file(path);
    write_to(file);
    file.commit();
  }

 private:
  std::string header_bytes() const {
    std::vector<detail::HeaderEntry> entries;
    entries.reserve(entries_.size());
    for (const auto& [name, e] : entries_)
      entries.push_back({&name, e.dtype, &e.shape, e.bytes.size()});
    return detail::safetensors_header(metadata_, entries);
  }

  struct Entry {
    Dtype dtype = Dtype::f32;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;
  };
  std::map<std::string, Entry> entries_;  // sorted by name: deterministic files
  std::map<std::string, std::string> metadata_;
};

}  // namespace io
PEFT_NAMESPACE_END
