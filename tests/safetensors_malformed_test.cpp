// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// safetensors: every malformed input is refused, one fault at a time, with a typed error whose
// message names the file, the tensor and the fault. Inputs are hand-assembled byte strings.
#include <peft/io/safetensors.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

using namespace peft;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

const std::string label = "bad.safetensors";

/// 8-byte little-endian `length`, then `header`, then `data` (length need not match the header).
std::string assemble(std::uint64_t length, const std::string& header,
                     const std::string& data = {}) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = static_cast<char>((length >> (8 * i)) & 0xff);
  return out + header + data;
}

/// A well-formed file layout: the real header length, then header and data.
std::string file(const std::string& header, const std::string& data = {}) {
  return assemble(header.size(), header, data);
}

/// One tensor entry as JSON text.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":" + offsets + "}";
}

io::SafetensorsReader parse(const std::string& bytes, const io::ReaderLimits& limits = {}) {
  return io::SafetensorsReader::from_buffer(bytes, label, limits);
}

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("peft_safetensors_malformed_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

// Each malformed input is checked twice: the exception type, and a message that carries the
// label plus the fragments given.
#define CHECK_FORMAT_ERROR(bytes, matcher)                             \
  do {                                                                 \
    const std::string peft_bytes_ = (bytes);                           \
    CHECK_THROWS_AS(parse(peft_bytes_), format_error);                 \
    CHECK_THROWS_WITH(parse(peft_bytes_), Contains(label) && matcher); \
  } while (0)

TEST_CASE("safetensors malformed: too short for the length prefix",
          "[io][safetensors][malformed]") {
  CHECK_FORMAT_ERROR(std::string(), Contains("0 bytes") && Contains("8-byte header length"));
  CHECK_FORMAT_ERROR(std::string(7, '\0'), Contains("7 bytes") && Contains("8-byte header length"));
}

TEST_CASE("safetensors malformed: header length past the end or over the limit",
          "[io][safetensors][malformed]") {
  // One byte more than the file holds.
  CHECK_FORMAT_ERROR(assemble(3, "{}"),
                     Contains("header length 3 runs past the end of the file (10 bytes)"));
  // 2^64 - 1 with no limit: 8 + n must not wrap around and pass the check.
  io::ReaderLimits none;
  none.max_header_bytes = ~std::uint64_t(0);
  CHECK_THROWS_AS(parse(assemble(~std::uint64_t(0), "{}"), none), format_error);
  CHECK_THROWS_WITH(
      parse(assemble(~std::uint64_t(0), "{}"), none),
      Contains(label) && Contains("header length 18446744073709551615 runs past the end"));
  CHECK_FORMAT_ERROR(assemble(~std::uint64_t(0), "{}"), Contains("exceeds the limit"));
  // A length that would fit in the file but exceeds the caller's limit.
  const std::string padded = "{}" + std::string(100, ' ');
  io::ReaderLimits small;
  small.max_header_bytes = 64;
  CHECK_THROWS_AS(parse(file(padded), small), format_error);
  CHECK_THROWS_WITH(parse(file(padded), small),
                    Contains(label) && Contains("header length 102 exceeds the limit of 64 bytes"));
  CHECK_NOTHROW(parse(file(padded)));  // the same bytes under the default limit
  // The default limit is 100 MB: a header claiming more is refused before anything is read.
  CHECK_FORMAT_ERROR(assemble((100u << 20) + 1, "{}"),
                     Contains("exceeds the limit of 104857600 bytes"));
}

TEST_CASE("safetensors malformed: header that is not a JSON object",
          "[io][safetensors][malformed]") {
  CHECK_FORMAT_ERROR(file(""), Contains("header is not valid JSON"));
  CHECK_FORMAT_ERROR(file("{\"w\": "), Contains("header is not valid JSON"));
  CHECK_FORMAT_ERROR(file("{} trailing"), Contains("header is not valid JSON"));
  CHECK_FORMAT_ERROR(file(std::string("{\"\xff\":1}")),
                     Contains("header is not valid JSON"));  // not UTF-8
  CHECK_FORMAT_ERROR(file("[1, 2]"), Contains("header is not a JSON object"));
  CHECK_FORMAT_ERROR(file("\"F32\""), Contains("header is not a JSON object"));
  CHECK_FORMAT_ERROR(file("null"), Contains("header is not a JSON object"));
}

TEST_CASE("safetensors malformed: tensor entry that is not an object",
          "[io][safetensors][malformed]") {
  CHECK_FORMAT_ERROR(file("{\"w\": 3}"), Contains("tensor 'w': entry is not an object"));
  CHECK_FORMAT_ERROR(file("{\"w\": [\"F32\", [1], [0, 4]]}"),
                     Contains("tensor 'w': entry is not an object"));
}

TEST_CASE("safetensors malformed: unknown or missing dtype", "[io][safetensors][malformed]") {
  const std::string data(4, '\0');
  for (const char* dtype : {"I8", "F8_E4M3", "U8", "BOOL", "f32", ""}) {
    INFO("dtype '" << dtype << "'");
    CHECK_FORMAT_ERROR(file("{" + entry("w", dtype, "[1]", "[0, 4]") + "}", data),
                       Contains("tensor 'w': unsupported dtype '" + std::string(dtype) + "'"));
  }
  CHECK_FORMAT_ERROR(file("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", data),
                     Contains("tensor 'w': missing or non-string dtype"));
  CHECK_FORMAT_ERROR(file("{\"w\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", data),
                     Contains("tensor 'w': missing or non-string dtype"));
}

TEST_CASE("safetensors malformed: missing, negative or non-integer shape",
          "[io][safetensors][malformed]") {
  const std::string data(16, '\0');
  CHECK_FORMAT_ERROR(file("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,16]}}", data),
                     Contains("tensor 'w': missing or non-array shape"));
  CHECK_FORMAT_ERROR(file("{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}", data),
                     Contains("tensor 'w': missing or non-array shape"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[-1, -4]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape entry -1 is not a non-negative integer"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[2.5]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape entry 2.5 is not a non-negative integer"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[4.0]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape entry 4.0 is not a non-negative integer"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[\"4\"]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape entry \"4\" is not a non-negative integer"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[true]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape entry true is not a non-negative integer"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[null]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape entry null is not a non-negative integer"));
  // Beyond 2^64 - 1 the JSON parser gives a float: still not an integer, never a wrapped value.
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[18446744073709551620]", "[0, 16]") + "}", data),
      Contains("tensor 'w': shape entry") && Contains("is not a non-negative integer"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[1,1,1,1,1,1,1,1,4]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': 9 dimensions (at most 8)"));
}

TEST_CASE("safetensors malformed: shape product overflowing 64 bits",
          "[io][safetensors][malformed]") {
  // 2^32 * 2^32 elements: the element count itself overflows.
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[4294967296, 4294967296]", "[0, 0]") + "}"),
      Contains("tensor 'w': shape [4294967296,4294967296] overflows the byte count"));
  // 2^62 elements fit, 2^62 * 4 bytes do not.
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[4611686018427387904]", "[0, 0]") + "}"),
                     Contains("tensor 'w': shape [4611686018427387904] overflows the byte count"));
  // A single dimension above INT64_MAX (it would turn negative as an int64 shape).
  CHECK_FORMAT_ERROR(file("{" + entry("w", "BF16", "[9223372036854775808]", "[0, 0]") + "}"),
                     Contains("tensor 'w': shape [9223372036854775808] overflows the byte count"));
  // Products that wrap to the right span: 2^63 BF16 elements are 2^64 = 0 bytes mod 2^64.
  CHECK_FORMAT_ERROR(file("{" + entry("w", "BF16", "[2147483648, 4294967296]", "[0, 0]") + "}"),
                     Contains("tensor 'w'") && Contains("overflows the byte count"));
}

TEST_CASE("safetensors malformed: hostile JSON values are quoted briefly, never recursively",
          "[io][safetensors][malformed]") {
  // A value nested 300000 deep parses (nlohmann's parser is iterative) but dumping it into the
  // message used to overflow the stack. Messages now summarise structured values.
  const std::string deep = std::string(300000, '[') + std::string(300000, ']');
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[" + deep + "]", "[0, 0]") + "}"),
      Contains("tensor 'w': shape entry (an array of 1 entries) is not a non-negative integer"));
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[4294967296, 4294967296, " + deep + "]", "[0, 0]") + "}"),
      Contains("tensor 'w': shape (an array of 3 entries) overflows the byte count"));
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[0]", "[0, " + deep + "]") + "}"),
      Contains("tensor 'w': data_offsets (an array of 2 entries) are not non-negative integers"));
  // A megabyte-long string or parse error stays a short message.
  const std::string long_string = "\"" + std::string(1 << 20, 'x') + "\"";
  const std::string cases[] = {
      file("{" + entry("w", "F32", "[" + long_string + "]", "[0, 0]") + "}"),
      file("{\"w\": \"" + std::string(1 << 20, 'x') + "\x01\"}"),  // control character at the end
  };
  for (const std::string& bytes : cases) {
    CHECK_THROWS_AS(parse(bytes), format_error);
    try {
      parse(bytes);
    } catch (const format_error& e) {
      CHECK(std::string(e.what()).size() < 1000);
    }
  }
}

TEST_CASE("safetensors malformed: missing or bad data_offsets", "[io][safetensors][malformed]") {
  const std::string data(16, '\0');
  const std::string begin = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4]";
  CHECK_FORMAT_ERROR(file(begin + "}}", data),
                     Contains("tensor 'w': data_offsets must be an array [begin, end]"));
  CHECK_FORMAT_ERROR(file(begin + ",\"data_offsets\":16}}", data),
                     Contains("tensor 'w': data_offsets must be an array [begin, end]"));
  CHECK_FORMAT_ERROR(file(begin + ",\"data_offsets\":[0,8,16]}}", data),
                     Contains("tensor 'w': data_offsets must be an array [begin, end]"));
  CHECK_FORMAT_ERROR(file(begin + ",\"data_offsets\":[16]}}", data),
                     Contains("tensor 'w': data_offsets must be an array [begin, end]"));
  CHECK_FORMAT_ERROR(file(begin + ",\"data_offsets\":[-16,0]}}", data),
                     Contains("tensor 'w': data_offsets [-16,0] are not non-negative integers"));
  CHECK_FORMAT_ERROR(file(begin + ",\"data_offsets\":[0,16.0]}}", data),
                     Contains("tensor 'w': data_offsets [0,16.0] are not non-negative integers"));
  CHECK_FORMAT_ERROR(file(begin + ",\"data_offsets\":[0,\"16\"]}}", data),
                     Contains("tensor 'w': data_offsets [0,\"16\"] are not non-negative integers"));
}

TEST_CASE("safetensors malformed: reversed, out-of-range and overlapping spans",
          "[io][safetensors][malformed]") {
  const std::string data(32, '\0');
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F32", "[4]", "[16, 0]") + "}", data),
                     Contains("tensor 'w': data_offsets [16,0] end before they begin"));
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[4]", "[24, 40]") + "}", data),
      Contains("tensor 'w': data_offsets [24,40] run past the end of the data (32 bytes)"));
  // A span starting beyond the data (begin + size would wrap if computed carelessly).
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[0]", "[18446744073709551615, 18446744073709551615]") + "}",
           data),
      Contains("tensor 'w': data_offsets") && Contains("run past the end of the data"));
  CHECK_FORMAT_ERROR(file("{" + entry("a", "F32", "[4]", "[0, 16]") + "," +
                              entry("b", "F32", "[4]", "[8, 24]") + "}",
                          data),
                     Contains("tensors 'a' [0, 16) and 'b' [8, 24) overlap"));
  // Same start; and one span nested inside another, listed in the other order.
  CHECK_FORMAT_ERROR(file("{" + entry("a", "F32", "[2]", "[4, 12]") + "," +
                              entry("b", "F16", "[4]", "[4, 12]") + "}",
                          data),
                     Contains("tensors '") && Contains("' [4, 12) overlap"));
  CHECK_FORMAT_ERROR(file("{" + entry("inner", "F32", "[2]", "[8, 16]") + "," +
                              entry("outer", "F64", "[4]", "[0, 32]") + "}",
                          data),
                     Contains("tensors 'outer' [0, 32) and 'inner' [8, 16) overlap"));
  // Touching spans are fine.
  CHECK_NOTHROW(parse(file(
      "{" + entry("a", "F32", "[4]", "[0, 16]") + "," + entry("b", "F32", "[4]", "[16, 32]") + "}",
      data)));
}

TEST_CASE("safetensors malformed: data bytes that no tensor covers",
          "[io][safetensors][malformed]") {
  const std::string data(32, '\0');
  CHECK_FORMAT_ERROR(file("{" + entry("a", "F32", "[4]", "[0, 16]") + "," +
                              entry("b", "F32", "[2]", "[24, 32]") + "}",
                          data),
                     Contains("data bytes [16, 24) before tensor 'b' belong to no tensor"));
  CHECK_FORMAT_ERROR(file("{" + entry("a", "F32", "[4]", "[8, 24]") + "," +
                              entry("b", "F32", "[2]", "[24, 32]") + "}",
                          data),
                     Contains("data bytes [0, 8) before tensor 'a' belong to no tensor"));
  CHECK_FORMAT_ERROR(file("{" + entry("a", "F32", "[4]", "[0, 16]") + "}", data),
                     Contains("data bytes [16, 32) at the end of the data belong to no tensor"));
  CHECK_FORMAT_ERROR(file("{}", data),
                     Contains("data bytes [0, 32) at the end of the data belong to no tensor"));
  // Empty tensors claim nothing, wherever their offsets point.
  CHECK_FORMAT_ERROR(file("{" + entry("e", "F32", "[0]", "[4, 4]") + "}", data),
                     Contains("data bytes [0, 32) at the end of the data"));
}

TEST_CASE("safetensors malformed: shape times dtype size differs from the span",
          "[io][safetensors][malformed]") {
  const std::string data(32, '\0');
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "F32", "[2, 2]", "[0, 8]") + "}", data),
      Contains("tensor 'w': shape [2, 2] of F32 needs 16 bytes, data_offsets span 8"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F16", "[4]", "[0, 16]") + "}", data),
                     Contains("tensor 'w': shape [4] of F16 needs 8 bytes, data_offsets span 16"));
  CHECK_FORMAT_ERROR(file("{" + entry("w", "F64", "[]", "[0, 4]") + "}", data),
                     Contains("tensor 'w': shape [] of F64 needs 8 bytes, data_offsets span 4"));
  CHECK_FORMAT_ERROR(
      file("{" + entry("w", "BF16", "[0, 3]", "[0, 2]") + "}", data),
      Contains("tensor 'w': shape [0, 3] of BF16 needs 0 bytes, data_offsets span 2"));
}

TEST_CASE("safetensors malformed: __metadata__ that is not a string map",
          "[io][safetensors][malformed]") {
  CHECK_FORMAT_ERROR(file("{\"__metadata__\": [\"format\", \"pt\"]}"),
                     Contains("__metadata__ is not an object"));
  CHECK_FORMAT_ERROR(file("{\"__metadata__\": \"pt\"}"), Contains("__metadata__ is not an object"));
  CHECK_FORMAT_ERROR(file("{\"__metadata__\": {\"format\": \"pt\", \"step\": 3}}"),
                     Contains("__metadata__ value 'step' is not a string"));
  CHECK_FORMAT_ERROR(file("{\"__metadata__\": {\"nested\": {\"a\": \"b\"}}}"),
                     Contains("__metadata__ value 'nested' is not a string"));
}

TEST_CASE("safetensors malformed: reads that do not match the tensor",
          "[io][safetensors][malformed]") {
  const std::string data(4 * 6 + 4, '\0');
  const auto r = parse(file("{" + entry("w", "F32", "[2, 3]", "[0, 24]") + "," +
                                entry("t", "F32", "[1, 1, 1]", "[24, 28]") + "}",
                            data));
  std::vector<float> buf(8);
  CHECK_THROWS_AS(r.read("w", buf.data(), 5), format_error);
  CHECK_THROWS_WITH(
      r.read("w", buf.data(), 5),
      Contains(label) && Contains("tensor 'w' has 6 elements [2, 3], the destination holds 5"));
  CHECK_THROWS_WITH(r.read("w", buf.data(), 7), Contains("the destination holds 7"));
  CHECK_THROWS_WITH(r.read("w", buf.data(), -1), Contains("the destination holds -1"));
  CHECK_NOTHROW(r.read("w", buf.data(), 6));
  CHECK_THROWS_AS(r.read("missing", buf.data(), 6), format_error);
  CHECK_THROWS_WITH(r.read("missing", buf.data(), 6),
                    Contains(label) && Contains("no tensor named 'missing'"));
  CHECK_THROWS_WITH(
      r.matrix<double>("t"),
      Contains(label) && Contains("tensor 't' has shape [1, 1, 1], expected a matrix"));
  CHECK_THROWS_WITH(r.vector<double>("w"),
                    Contains(label) && Contains("tensor 'w' has shape [2, 3], expected a vector"));
  CHECK_THROWS_AS(r.info("W"), format_error);  // names are case-sensitive
}

TEST_CASE("safetensors malformed: valid edge cases parse", "[io][safetensors][malformed]") {
  SECTION("no tensors") {
    CHECK(parse(file("{}")).tensors().empty());
    CHECK(parse(file("{}  ")).tensors().empty());  // padding spaces, as writers add
    const auto r = parse(file("{\"__metadata__\":{\"format\":\"pt\"}}"));
    CHECK(r.tensors().empty());
    CHECK(r.metadata().at("format") == "pt");
    CHECK(parse(file("{\"__metadata__\":{}}")).metadata().empty());
  }
  SECTION("zero-size tensors anywhere in the data, scalars") {
    const std::string data(8, '\0');
    const auto r = parse(file("{" + entry("e0", "F32", "[0, 4]", "[0, 0]") + "," +
                                  entry("e1", "BF16", "[0]", "[2, 2]") + "," +
                                  entry("e2", "F64", "[3, 0, 5]", "[8, 8]") + "," +
                                  entry("s", "F64", "[]", "[0, 8]") + "}",
                              data));
    REQUIRE(r.tensors().size() == 4);
    CHECK(r.matrix<float>("e0").rows() == 0);
    CHECK(r.matrix<float>("e0").cols() == 4);
    CHECK(r.vector<double>("e1").size() == 0);
    CHECK(r.info("e2").numel() == 0);
    std::vector<double> none;
    CHECK_NOTHROW(r.read("e2", none.data(), 0));
    double scalar = -1.0;
    r.read("s", &scalar, 1);
    CHECK(scalar == 0.0);
  }
  SECTION("the data section produced by the writer, cut anywhere, never parses") {
    io::SafetensorsWriter w;
    w.add("a", RowMatrix<float>::Ones(2, 3));
    w.add("b", RowMatrix<double>::Ones(1, 2), io::Dtype::f16);
    const std::string bytes = w.serialize();
    CHECK_NOTHROW(parse(bytes));
    for (std::size_t cut = 0; cut < bytes.size(); ++cut) {
      INFO("cut at " << cut << " of " << bytes.size());
      CHECK_THROWS_AS(parse(bytes.substr(0, cut)), format_error);
    }
  }
}

TEST_CASE("safetensors malformed: files on disk", "[io][safetensors][malformed]") {
  const fs::path dir = temp_dir("disk");
  io::SafetensorsWriter w;
  w.add("layer.a", RowMatrix<float>::Constant(4, 4, 0.5f));
  w.add("layer.b", RowMatrix<float>::Constant(4, 2, 2.0f), io::Dtype::bf16);
  const std::string bytes = w.serialize();
  const std::uint64_t header_len = bytes.size() - 8 - 4 * 4 * 4 - 4 * 2 * 2;

  SECTION("missing file and directory: io_error with the path") {
    const std::string missing = (dir / "missing.safetensors").string();
    CHECK_THROWS_AS(io::SafetensorsReader(missing), io_error);
    CHECK_THROWS_WITH(io::SafetensorsReader(missing), Contains(missing) && Contains("cannot open"));
    CHECK_THROWS_AS(io::SafetensorsReader(dir.string()), io_error);
    CHECK_THROWS_WITH(io::SafetensorsReader(dir.string()), Contains(dir.string()));
  }
  SECTION("empty and 5-byte files") {
    const fs::path p = dir / "empty.safetensors";
    write_file(p, "");
    CHECK_THROWS_AS(io::SafetensorsReader(p.string()), format_error);
    CHECK_THROWS_WITH(io::SafetensorsReader(p.string()),
                      Contains(p.string()) && Contains("file is 0 bytes"));
    write_file(p, bytes.substr(0, 5));
    CHECK_THROWS_WITH(io::SafetensorsReader(p.string()),
                      Contains(p.string()) && Contains("file is 5 bytes"));
  }
  SECTION("truncated inside the header") {
    const fs::path p = dir / "cut_header.safetensors";
    write_file(p, bytes.substr(0, 8 + header_len / 2));
    CHECK_THROWS_AS(io::SafetensorsReader(p.string()), format_error);
    CHECK_THROWS_WITH(io::SafetensorsReader(p.string()),
                      Contains(p.string()) &&
                          Contains("header length " + std::to_string(header_len)) &&
                          Contains("runs past the end of the file"));
  }
  SECTION("truncated inside the data: the last tensor's span runs past the end") {
    const fs::path p = dir / "cut_data.safetensors";
    write_file(p, bytes.substr(0, bytes.size() - 3));
    CHECK_THROWS_AS(io::SafetensorsReader(p.string()), format_error);
    CHECK_THROWS_WITH(io::SafetensorsReader(p.string()),
                      Contains(p.string()) && Contains("tensor 'layer.b'") &&
                          Contains("run past the end of the data"));
  }
  SECTION("truncated after opening: the read fails with io_error, never reads stale memory") {
    const fs::path p = dir / "shrinks.safetensors";
    write_file(p, bytes);
    const io::SafetensorsReader r(p.string());
    CHECK(r.matrix<float>("layer.a") == RowMatrix<float>::Constant(4, 4, 0.5f));
    fs::resize_file(p, bytes.size() - 1);
    CHECK_THROWS_AS(r.matrix<float>("layer.b"), io_error);
    CHECK_THROWS_WITH(r.matrix<float>("layer.b"),
                      Contains(p.string()) && Contains("tensor 'layer.b' is cut short"));
  }
  fs::remove_all(dir);
}
