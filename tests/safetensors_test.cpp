// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// safetensors: round trips in every dtype, half/bfloat16 rounding, atomic replacement.
#include "support/test_support.hpp"

#include <peft/io/safetensors.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

using namespace peft;
using peft::io::Dtype;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_safetensors_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_CASE("safetensors: F32 and F64 round trips are exact, metadata and names kept",
          "[io][safetensors]") {
  const fs::path dir = temp_dir("roundtrip");
  const RowMatrix<float> a = peft_test::random_matrix<float>(5, 3, 1);
  const Matrix<double, Eigen::ColMajor> b =
      peft_test::random_matrix<double, Eigen::ColMajor>(4, 6, 2);
  const Vector<float> v = peft_test::random_vector<float>(7, 3);
  io::SafetensorsWriter w;
  w.add("layer.a", a);
  w.add("layer.b", b, Dtype::f64);
  w.add_vector("layer.v", v);
  w.add("empty", RowMatrix<float>(0, 4));
  w.set_metadata("format", "pt");
  const std::string path = (dir / "t.safetensors").string();
  w.save(path);

  const io::SafetensorsReader r(path);
  CHECK(r.names() == std::vector<std::string>{"empty", "layer.a", "layer.b", "layer.v"});
  CHECK(r.metadata().at("format") == "pt");
  CHECK(r.info("layer.b").dtype == Dtype::f64);
  CHECK(r.info("layer.b").shape == std::vector<std::int64_t>{4, 6});
  CHECK(r.info("layer.v").shape == std::vector<std::int64_t>{7});
  CHECK(r.matrix<float>("layer.a") == a);
  CHECK(r.matrix<double>("layer.b") == RowMatrix<double>(b));
  CHECK(r.vector<float>("layer.v") == v);
  CHECK(r.matrix<float>("empty").rows() == 0);
  CHECK(r.matrix<double>("layer.a") == a.cast<double>());  // F32 → double widens exactly

  // The header is padded to 8 bytes and the data section is exactly the tensors.
  const std::string bytes = read_bytes(path);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[std::size_t(i)]);
  CHECK(n % 8 == 0);
  CHECK(bytes.size() == 8 + n + 15 * 4 + 24 * 8 + 7 * 4);
  CHECK(bytes == w.serialize());

  // The same bytes parse from memory.
  const auto m = io::SafetensorsReader::from_buffer(bytes, "mem");
  CHECK(m.vector<float>("layer.v") == v);
  CHECK_THROWS_AS(r.matrix<float>("nope"), format_error);
  CHECK_THROWS_AS(r.vector<float>("layer.a"), format_error);
}

TEST_CASE("safetensors: the same tensors always give the same bytes", "[io][safetensors]") {
  auto build = [](bool reverse) {
    io::SafetensorsWriter w;
    const RowMatrix<float> x = peft_test::random_matrix<float>(3, 2, 9);
    if (reverse) {
      w.add("z", x);
      w.add("a", x.transpose());
    } else {
      w.add("a", x.transpose());
      w.add("z", x);
    }
    return w.serialize();
  };
  CHECK(build(false) == build(true));
}

TEST_CASE("half and bfloat16: widening is exact and narrowing rounds to nearest even",
          "[io][safetensors]") {
  using namespace peft::io::detail;
  // Every binary16 pattern survives half → float → half (NaNs stay NaN).
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_to_float(std::uint16_t(h));
    if (std::isnan(f)) {
      CHECK(std::isnan(half_to_float(double_to_half(f))));
      continue;
    }
    REQUIRE(double_to_half(f) == h);
    REQUIRE(double_to_bfloat16(bfloat16_to_float(std::uint16_t(h))) == h);
  }
  CHECK(half_to_float(0x3C00) == 1.0f);
  CHECK(half_to_float(0x7BFF) == 65504.0f);
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));
  // Ties go to even; just above a tie goes up; overflow and underflow.
  CHECK(double_to_half(1.0 + std::ldexp(1.0, -11)) == 0x3C00);      // tie → even (1.0)
  CHECK(double_to_half(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3C02);  // tie → even (up)
  CHECK(double_to_half(1.0 + std::ldexp(1.0, -11) + 1e-12) == 0x3C01);
  CHECK(double_to_half(65519.0) == 0x7BFF);
  CHECK(double_to_half(65520.0) == 0x7C00);               // rounds to inf
  CHECK(double_to_half(std::ldexp(1.0, -25)) == 0x0000);  // tie → even (0)
  CHECK(double_to_half(std::ldexp(1.5, -25)) == 0x0001);
  CHECK(double_to_half(-std::ldexp(1023.5, -24)) == (0x8000 | 0x0400));  // carry into normal
  CHECK(double_to_bfloat16(1.0 + std::ldexp(1.0, -8)) == 0x3F80);        // tie → even
  CHECK(double_to_bfloat16(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3F82);
  CHECK(double_to_bfloat16(std::numeric_limits<float>::max()) == 0x7F80);  // above bf16 max
  CHECK(double_to_bfloat16(-0.0) == 0x8000);
  // A double is rounded once, not through float: 1 + 2^-8 + 2^-30 is above the bf16 tie.
  CHECK(double_to_bfloat16(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30)) == 0x3F81);
}

TEST_CASE("safetensors: F16/BF16 tensors are written rounded and read converted",
          "[io][safetensors]") {
  const RowMatrix<double> m = peft_test::random_matrix<double>(6, 5, 4);
  io::SafetensorsWriter w;
  w.add("h", m, Dtype::f16);
  w.add("b", m, Dtype::bf16);
  const auto r = io::SafetensorsReader::from_buffer(w.serialize());
  CHECK(r.info("h").dtype == Dtype::f16);
  CHECK(r.info("b").end - r.info("b").begin == 60);
  const RowMatrix<float> h = r.matrix<float>("h");
  const RowMatrix<float> b = r.matrix<float>("b");
  for (Index i = 0; i < m.size(); ++i) {
    CHECK(h.data()[i] == io::detail::half_to_float(io::detail::double_to_half(m.data()[i])));
    CHECK(b.data()[i] ==
          io::detail::bfloat16_to_float(io::detail::double_to_bfloat16(m.data()[i])));
    CHECK(std::abs(h.data()[i] - m.data()[i]) <= std::ldexp(std::abs(m.data()[i]), -11) + 1e-7);
  }
}

TEST_CASE("safetensors: a failed save leaves the previous file and no temporary behind",
          "[io][safetensors]") {
  const fs::path dir = temp_dir("atomic");
  const std::string path = (dir / "model.safetensors").string();
  io::SafetensorsWriter good;
  good.add("w", RowMatrix<float>::Ones(2, 2));
  good.save(path);
  const std::string before = read_bytes(path);

  // Saving into a folder that does not exist fails before anything is written.
  CHECK_THROWS_AS(good.save((dir / "missing" / "x.safetensors").string()), io_error);

  // A writer abandoned mid-write (as an exception would) removes its temporary file.
  {
    io::detail::AtomicFileWriter file(path);
    file.write("garbage", 7);
    CHECK(fs::exists(file.temp_path()));
  }
  CHECK(read_bytes(path) == before);
  std::size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    (void)entry;
    ++files;
  }
  CHECK(files == 1);

  // A successful save replaces the file in one step.
  io::SafetensorsWriter next;
  next.add("w", RowMatrix<float>::Zero(3, 3));
  next.save(path);
  CHECK(io::SafetensorsReader(path).matrix<float>("w").rows() == 3);
}

TEST_CASE("safetensors: read_bytes gives a tensor's stored bytes, in range only",
          "[io][safetensors]") {
  io::SafetensorsWriter w;
  const RowMatrix<float> m = peft_test::random_matrix<float>(3, 5, 21);
  w.add("a", m, io::Dtype::bf16);
  w.add("b", m, io::Dtype::f32);
  const fs::path path = temp_dir("read_bytes") / "t.safetensors";
  w.save(path.string());
  const std::string file = read_bytes(path);
  for (const bool from_file : {true, false}) {
    CAPTURE(from_file);
    const io::SafetensorsReader r =
        from_file ? io::SafetensorsReader(path.string()) : io::SafetensorsReader::from_buffer(file);
    // The data section follows the 8-byte length and the header; "b" follows "a".
    const std::size_t data = file.size() - 30 - 60;
    std::string a(30, '\0'), b_tail(20, '\0');
    r.read_bytes("a", 0, &a[0], a.size());
    CHECK(a == file.substr(data, 30));
    r.read_bytes("b", 40, &b_tail[0], b_tail.size());
    CHECK(b_tail == file.substr(data + 30 + 40, 20));
    // Decoding the raw bf16 bytes gives what read() converts.
    RowMatrix<float> via_read(3, 5);
    r.read("a", via_read.data(), 15);
    for (Index i = 0; i < 15; ++i) {
      const auto lo = static_cast<unsigned char>(a[std::size_t(2 * i)]),
                 hi = static_cast<unsigned char>(a[std::size_t(2 * i + 1)]);
      CHECK(io::detail::bfloat16_to_float(std::uint16_t(lo | hi << 8)) == via_read.data()[i]);
    }
    CHECK_THROWS_AS(r.read_bytes("a", 20, &a[0], 11), format_error);  // past its 30 bytes
    CHECK_THROWS_WITH(r.read_bytes("a", 31, &a[0], 0), Catch::Matchers::Contains("'a'"));
    CHECK_THROWS_AS(r.read_bytes("c", 0, &a[0], 1), format_error);
  }
}
