// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Issue #21: hostile and unlucky inputs. Each crafted input of the report gets its answer here,
// at sizes near the caps; a blow-up would hang this test past its ctest TIMEOUT (timings are never
// asserted). Nothing may be written on a refusal, no mixed folder may load, no temporary file may
// survive.
#include "support/test_support.hpp"

#include <peft/io/adapter_files.hpp>
#include <peft/io/merge.hpp>
#include <peft/lora.hpp>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <unistd.h>

using namespace peft;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("peft_hostile_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

// Names in `dir` that contain ".peft-tmp-".
std::vector<std::string> temp_files(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".peft-tmp-") != std::string::npos)
      out.push_back(e.path().filename().string());
  return out;
}

// A LORA folder's tensors in memory: `modules` modules at rank 2 over [size, size] weights (0:
// 0-byte tensors).
std::string zero_byte_lora_tensors(int modules, Index size = 0) {
  io::SafetensorsWriter w;
  const RowMatrix<float> a = RowMatrix<float>::Zero(2, size), b = RowMatrix<float>::Zero(size, 2);
  for (int i = 0; i < modules; ++i) {
    const std::string m = "base_model.model.model.layers." + std::to_string(i) + ".q_proj";
    w.add(m + ".lora_A.weight", a);
    w.add(m + ".lora_B.weight", b);
  }
  return w.serialize();
}

io::AdapterFolder<float> small_lora(double alpha) {
  io::AdapterFolder<float> f;
  f.config.peft_type = io::PeftType::lora;
  f.config.r = 2;
  f.config.lora_alpha = alpha;
  io::ModuleTensors<float> m;
  m.name = "model.q";
  m.rank = 2;
  m.a = peft_test::random_matrix<float>(2, 3, 1);
  m.b = peft_test::random_matrix<float>(4, 2, 2);
  f.modules.push_back(m);
  return f;
}

// Runs f once; it must throw E with `part` in its message.
template <typename E, typename F>
void check_throws(F&& f, const std::string& part) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    CHECK_THAT(std::string(e.what()), Contains(part));
  }
  CHECK(thrown);
}

}  // namespace

// ---- 1. no hang --------------------------------------------------------------------------------

TEST_CASE("pattern keys: PEFT's rule without backtracking blow-ups", "[io][hostile][pattern]") {
  // The report's inputs: minutes under std::regex, one linear pass here.
  CHECK_FALSE(io::pattern_key_matches("(a|aa)*c", "model." + std::string(60, 'a')));
  CHECK(io::pattern_key_matches("(a|aa)*c", "model." + std::string(60, 'a') + "c"));
  CHECK_FALSE(io::pattern_key_matches("((a*)*)*b", std::string(1018, 'a')));
  CHECK(io::pattern_key_matches("((a*)*)*b", std::string(1017, 'a') + "b"));
  // PEFT's semantics: suffix after a dot, '^' anchors, dots are wildcards, '$' implied.
  CHECK(io::pattern_key_matches("q_proj", "model.layers.0.q_proj"));
  CHECK_FALSE(io::pattern_key_matches("q_proj", "model.layers.0.xq_proj"));
  CHECK_FALSE(io::pattern_key_matches("^q_proj", "model.q_proj"));
  CHECK(io::pattern_key_matches("^model.q_proj", "model.q_proj"));
  CHECK(io::pattern_key_matches("layers.0.q", "model.layersX0Xq"));
  CHECK_FALSE(io::pattern_key_matches("layers\\.0\\.q", "model.layersX0Xq"));
  CHECK(io::pattern_key_matches("layers\\.(1|2)\\..*_proj", "model.layers.2.self_attn.v_proj"));
  CHECK_FALSE(
      io::pattern_key_matches("layers\\.(1|2)\\..*_proj", "model.layers.3.self_attn.v_proj"));
  CHECK(io::pattern_key_matches("[qk]_proj", "m.k_proj"));
  CHECK_FALSE(io::pattern_key_matches("[^qk]_proj", "m.k_proj"));
  CHECK(io::pattern_key_matches("\\d+\\.(?:q|k)_proj$", "m.12.q_proj"));
  CHECK_FALSE(io::pattern_key_matches("a.b", "x.a\nb"));  // '.' is not '\n', as in Python
  // Outside the subset: refused, naming the key.
  check_throws<config_error>([&] { (void)(io::pattern_key_matches("((a*)*)*\\1b", "x")); },
                             "((a*)*)*\\1b");
  CHECK_THROWS_AS(io::pattern_key_matches("(?=q)q", "q_proj_x"), config_error);
  CHECK_THROWS_AS(io::pattern_key_matches("a{2,3}", "aa_x"), config_error);
  CHECK_THROWS_AS(io::pattern_key_matches("(a", "a_x"), config_error);
  CHECK_THROWS_AS(io::pattern_key_matches("x", std::string(1025, 'x')), config_error);
  // A config with such a key parses (as before); the first lookup, or a load, refuses it by name.
  const auto lookbehind =
      io::AdapterConfig::parse(R"({"peft_type":"LORA","rank_pattern":{"(?<=a)b":4}})");
  check_throws<config_error>([&] { (void)lookbehind.rank_for("model.b"); }, "(?<=a)b");
  io::SafetensorsWriter w;
  w.add("base_model.model.model.b.lora_A.weight", RowMatrix<float>(8, 0));
  w.add("base_model.model.model.b.lora_B.weight", RowMatrix<float>(0, 8));
  check_throws<config_error>(
      [&] {
        (void)io::AdapterFolder<float>::from_buffers(
            R"({"peft_type":"LORA","rank_pattern":{"(?<=a)b":4}})", w.serialize(), "dir");
      },
      "dir/adapter_model.safetensors (with its adapter_config.json): pattern key '(?<=a)b'");
}

TEST_CASE("the 109-byte config against a 60-a module loads at once", "[io][hostile][pattern]") {
  const std::string config =
      R"({"peft_type":"LORA","r":2,"lora_alpha":4,"rank_pattern":{"(a|aa)*c":4}})";
  io::SafetensorsWriter w;
  const std::string m = "base_model.model.model." + std::string(60, 'a');
  w.add(m + ".lora_A.weight", RowMatrix<float>(2, 0));
  w.add(m + ".lora_B.weight", RowMatrix<float>(0, 2));
  const auto f = io::AdapterFolder<float>::from_buffers(config, w.serialize());
  REQUIRE(f.modules.size() == 1);
  CHECK(f.modules[0].rank == 2);
}

TEST_CASE("2,000 modules x 4,000 pattern keys: compiled once, answered at once",
          "[io][hostile][pattern]") {
  std::string config = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"rank_pattern":{)";
  for (int k = 0; k < 4000; ++k)
    config += (k ? "," : "") + std::string("\"layers.") + std::to_string(k) + ".k_proj\":4";
  config += "}}";
  const auto f = io::AdapterFolder<float>::from_buffers(config, zero_byte_lora_tensors(2000));
  CHECK(f.modules.size() == 2000);

  // The same number of regex keys would be ~10^9 NFA steps: refused by the work budget.
  std::string regex = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"rank_pattern":{)";
  for (int k = 0; k < 4000; ++k)
    regex += (k ? "," : "") + std::string("\"(a|b)*x") + std::to_string(k) + "\":4";
  regex += "}}";
  check_throws<format_error>(
      [&] { (void)(io::AdapterFolder<float>::from_buffers(regex, zero_byte_lora_tensors(2000))); },
      "matching steps");
}

TEST_CASE("merge_files: 2,000 modules x 4,000 pattern keys, each key compiled once",
          "[io][hostile][pattern]") {
  const fs::path dir = fresh_dir("merge_keys");
  std::string config = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"alpha_pattern":{)";
  for (int k = 0; k < 4000; ++k)
    config += (k ? "," : "") + std::string("\"layers.") + std::to_string(k) + ".k_proj\":4";
  config += "}}";
  fs::create_directories(dir / "adapter");
  spit(dir / "adapter" / "adapter_config.json", config);
  spit(dir / "adapter" / "adapter_model.safetensors", zero_byte_lora_tensors(2000, 2));
  io::SafetensorsWriter base;
  for (int i = 0; i < 2000; ++i)
    base.add("model.layers." + std::to_string(i) + ".q_proj.weight", RowMatrix<float>::Ones(2, 2));
  base.save((dir / "base.safetensors").string());
  const auto report =
      io::merge_files((dir / "base.safetensors").string(), (dir / "adapter").string(),
                      (dir / "out.safetensors").string());
  CHECK(report.modules.size() == 2000);
  fs::remove_all(dir);
}

TEST_CASE("config parsing is linear, bounded, and refuses duplicate keys", "[io][hostile][json]") {
  std::string many = R"({"peft_type":"LORA")";
  many.reserve(4 << 20);
  for (std::size_t k = 0; k + 2 < io::max_config_keys; ++k)
    many += ",\"unknown_" + std::to_string(k) + "\":0";
  const std::string under = many + "}";
  const io::AdapterConfig c = io::AdapterConfig::parse(under);
  CHECK(c.extra.size() == io::max_config_keys - 2);
  // One key over the cap (the report's 1e6-key, 12 MB file is refused the same way, early).
  std::string over = many + ",\"x1\":0,\"x2\":0}";
  check_throws<format_error>([&] { (void)(io::AdapterConfig::parse(over)); }, "object keys");

  check_throws<format_error>(
      [&] { (void)(io::AdapterConfig::parse(R"({"peft_type":"LORA","r":4,"r":8})")); },
      "duplicate key \"r\"");
  check_throws<format_error>(
      [&] {
        (void)(io::AdapterConfig::parse(R"({"peft_type":"LORA","rank_pattern":{"q":2,"q":4}})"));
      },
      "duplicate key \"q\"");
  // First-match order survives the std::map document.
  const auto ordered =
      io::AdapterConfig::parse(R"({"peft_type":"LORA","rank_pattern":{"z":2,"a":4}})");
  REQUIRE(ordered.rank_pattern.size() == 2);
  CHECK(ordered.rank_pattern[0].first == "z");
  CHECK(io::AdapterConfig::parse(ordered.dump()).rank_pattern[0].first == "z");
}

TEST_CASE("safetensors: duplicate tensor names are refused", "[io][hostile][json]") {
  std::string header =
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[std::size_t(i)] = char((header.size() >> (8 * i)) & 0xff);
  bytes += header + std::string(4, '\0');
  check_throws<format_error>([&] { (void)(io::SafetensorsReader::from_buffer(bytes)); },
                             "duplicate key \"w\"");
}

TEST_CASE("inputs must be regular files: FIFOs and symlink loops are refused, not waited on",
          "[io][hostile][fs]") {
  const fs::path dir = fresh_dir("fifo");
  io::AdapterFolder<float> f = small_lora(4);
  f.save(dir.string());
  const fs::path weights = dir / "adapter_model.safetensors";
  fs::remove(weights);
  REQUIRE(::mkfifo(weights.c_str(), 0600) == 0);
  check_throws<io_error>([&] { (void)(io::AdapterFolder<float>::load(dir.string())); },
                         "not a regular file");
  CHECK_THROWS_AS(io::SafetensorsReader(weights.string()), io_error);
  fs::remove(weights);
  f.save(dir.string());
  const fs::path config = dir / "adapter_config.json";
  fs::remove(config);
  REQUIRE(::mkfifo(config.c_str(), 0600) == 0);
  check_throws<io_error>([&] { (void)(io::AdapterFolder<float>::load(dir.string())); }, "FIFO");
  // A symlink loop: a peft::error, not std::filesystem::filesystem_error.
  fs::remove(config);
  fs::create_symlink("adapter_config.json", config);
  CHECK_THROWS_AS(io::AdapterFolder<float>::load(dir.string()), io_error);
  fs::remove_all(dir);
}

// ---- 2. resource limits
// --------------------------------------------------------------------------

TEST_CASE("VeRA's regenerated projections are bounded by the layers they serve",
          "[io][hostile][vera]") {
  RowMatrix<float> w = peft_test::random_matrix<float>(4, 8, 1);
  io::AdapterFolder<float> f;
  f.config.peft_type = io::PeftType::vera;
  f.config.save_projection = false;
  f.config.r = 250000;  // the report's 0.5 MB adapter: 6 GB of projections for a [4, 8] layer
  io::ModuleTensors<float> m;
  m.name = "model.q";
  m.rank = f.config.r;
  m.lambda_d = Vector<float>::Ones(f.config.r);
  m.lambda_b = Vector<float>::Ones(4);
  f.modules.push_back(m);
  AdapterSet<VeraLinear<float>> set;
  set.add_module("model.q", w);
  check_throws<format_error>([&] { (void)(io::apply(f, set)); }, "r = 250000");
  CHECK(set.adapted_modules().empty());
  f.config.r = 8;
  f.modules[0].rank = 8;
  f.modules[0].lambda_d = Vector<float>::Ones(8);
  CHECK_NOTHROW(io::apply(f, set));  // r = max(out, in) is still served
}

// ---- 3. overflow
// ---------------------------------------------------------------------------------

TEST_CASE("merge_into refuses an overflowing result and leaves W untouched", "[hostile][merge]") {
  RowMatrix<float> w = peft_test::random_matrix<float>(6, 5, 1);
  const RowMatrix<float> before = w;
  LoraOptions o;
  o.r = 2;
  o.lora_alpha = 1e30f;
  LoraLinear<float> lora(frozen(w), o);
  lora.b().setConstant(1e20f);
  lora.a().setConstant(1.0f);
  check_throws<numerical_error>([&] { (void)(lora.merge_into(w)); }, "overflows");
  CHECK(w == before);
  CHECK_FALSE(lora.merged());

  // A merged adapter whose factors grew cannot make unmerge destroy W.
  LoraOptions small;
  small.r = 2;
  LoraLinear<float> ok(frozen(w), small);
  ok.a().setConstant(1.0f);
  ok.b().setConstant(1.0f);
  REQUIRE(ok.merge_into(w));
  const RowMatrix<float> merged = w;
  ok.b().setConstant(std::numeric_limits<float>::max());
  CHECK_THROWS_AS(ok.unmerge_from(w), numerical_error);
  CHECK(w == merged);
  CHECK(ok.merged());
}

TEST_CASE("peft-merge: overflow and out-of-range dtypes exit with an error and write nothing",
          "[io][hostile][merge]") {
  const fs::path dir = fresh_dir("overflow");
  io::SafetensorsWriter base;
  base.add("model.q.weight", RowMatrix<float>::Constant(4, 3, 60000.0f));
  base.save((dir / "base.safetensors").string());
  const fs::path out = dir / "out.safetensors";

  small_lora(1e300).save((dir / "huge").string());  // W + ΔW (computed in double) overflows F32
  CHECK_THROWS_AS(
      io::merge_files((dir / "base.safetensors").string(), (dir / "huge").string(), out.string()),
      numerical_error);
  CHECK_FALSE(fs::exists(out));

  io::AdapterFolder<float> zero = small_lora(1);
  zero.modules[0].b.setZero();
  zero.save((dir / "zero").string());
  io::MergeOptions f16;
  f16.dtype = io::Dtype::f16;
  CHECK_NOTHROW(io::merge_files((dir / "base.safetensors").string(), (dir / "zero").string(),
                                out.string(), f16));
  fs::remove(out);
  zero.modules[0].a.setConstant(1.0f);
  zero.modules[0].b.setConstant(10000.0f);  // 60000 + 10000 > 65504
  zero.save((dir / "zero").string());
  check_throws<numerical_error>(
      [&] {
        (void)(io::merge_files((dir / "base.safetensors").string(), (dir / "zero").string(),
                               out.string(), f16));
      },
      "F16");
  CHECK_FALSE(fs::exists(out));
  CHECK(temp_files(dir).empty());
  fs::remove_all(dir);
}

// ---- 4. a folder save is atomic as a pair
// --------------------------------------------------------

TEST_CASE("a save interrupted between the two renames leaves a pair that load refuses",
          "[io][hostile][atomic]") {
  const fs::path dir = fresh_dir("pair");
  small_lora(4).save(dir.string());
  const std::string old_config = slurp(dir / "adapter_config.json");
  REQUIRE_NOTHROW(io::AdapterFolder<float>::load(dir.string()));

  struct Crash {};
  io::detail::after_tensors_published = [] { throw Crash{}; };
  CHECK_THROWS_AS(small_lora(8).save(dir.string()), Crash);  // alpha only: the ranks still agree
  io::detail::after_tensors_published = nullptr;
  CHECK(slurp(dir / "adapter_config.json") == old_config);  // new tensors, old config
  check_throws<format_error>([&] { (void)(io::AdapterFolder<float>::load(dir.string())); },
                             "two saves");

  // An edit made on purpose can be accepted, and is then reported.
  io::LoadOptions edited;
  edited.allow_edited_config = true;
  const auto mixed = io::AdapterFolder<float>::load(dir.string(), {}, edited);
  REQUIRE(mixed.warnings.size() == 1);
  CHECK(mixed.warnings[0].find("edited config") != std::string::npos);

  small_lora(8).save(dir.string());
  const auto back = io::AdapterFolder<float>::load(dir.string());
  CHECK(back.warnings.empty());
  CHECK(back.config.lora_alpha == 8);
  CHECK(back.metadata.count(io::config_digest_key) == 0);  // describes the files, not the folder
  CHECK(temp_files(dir).empty());
  fs::remove_all(dir);
}

// ---- 5. no temporary files survive
// ---------------------------------------------------------------

TEST_CASE("stale temporary files of dead processes are removed by the next save",
          "[io][hostile][temp]") {
  const fs::path dir = fresh_dir("stale");
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  REQUIRE(child > 0);
  ::waitpid(child, nullptr, 0);  // a pid that no longer runs
  const std::string dead = ".out.safetensors.peft-tmp-" + std::to_string(child) + "-0";
  const std::string live = ".out.safetensors.peft-tmp-" + std::to_string(::getppid()) + "-0";
  spit(dir / dead, "half a file");
  spit(dir / live, "another process is writing");
  io::SafetensorsWriter w;
  w.add("x", RowMatrix<float>::Ones(2, 2));
  w.save((dir / "out.safetensors").string());
  CHECK_FALSE(fs::exists(dir / dead));
  CHECK(fs::exists(dir / live));
  fs::remove_all(dir);
}

TEST_CASE("a signal during a save removes the temporary file", "[io][hostile][temp]") {
  const fs::path dir = fresh_dir("signal");
  const pid_t child = ::fork();
  if (child == 0) {
    io::install_temp_file_cleanup();
    io::detail::AtomicFileWriter file((dir / "big.safetensors").string());
    file.write(std::string(1 << 16, 'x'));
    ::raise(SIGTERM);
    ::_exit(3);  // not reached
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
  CHECK(temp_files(dir).empty());
  CHECK_FALSE(fs::exists(dir / "big.safetensors"));
  fs::remove_all(dir);
}

TEST_CASE("rewriting an output keeps its mode and writes through a symlink",
          "[io][hostile][temp]") {
  const fs::path dir = fresh_dir("mode");
  io::SafetensorsWriter w;
  w.add("x", RowMatrix<float>::Ones(2, 2));
  const fs::path out = dir / "out.safetensors";
  w.save(out.string());
  REQUIRE(::chmod(out.c_str(), 0600) == 0);
  w.add("y", RowMatrix<float>::Ones(1, 1));
  w.save(out.string());
  struct stat st;
  REQUIRE(::stat(out.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);

  const fs::path link = dir / "link.safetensors";
  fs::create_symlink("out.safetensors", link);
  io::SafetensorsWriter v;
  v.add("z", RowMatrix<float>::Ones(3, 1));
  v.save(link.string());
  CHECK(fs::is_symlink(link));
  CHECK(io::SafetensorsReader(out.string()).contains("z"));

  // A 240-character name (the temporary name would pass 255 bytes unshortened).
  const fs::path long_name = dir / (std::string(228, 'n') + ".safetensors");
  REQUIRE(long_name.filename().string().size() == 240);
  CHECK_NOTHROW(v.save(long_name.string()));
  CHECK(io::SafetensorsReader(long_name.string()).contains("z"));
  CHECK(temp_files(dir).empty());
  fs::remove_all(dir);
}

// ---- 6. the smaller items
// ------------------------------------------------------------------------

TEST_CASE("peft-merge refuses empty adapters and a dropped modules_to_save copy",
          "[io][hostile][merge]") {
  const fs::path dir = fresh_dir("small");
  io::SafetensorsWriter base;
  base.add("model.q.weight", RowMatrix<float>::Ones(4, 3));
  base.save((dir / "base.safetensors").string());
  const fs::path out = dir / "out.safetensors";

  fs::create_directories(dir / "empty");
  spit(dir / "empty" / "adapter_config.json", R"({"peft_type":"LORA","r":2,"lora_alpha":4})");
  io::SafetensorsWriter none;
  none.save((dir / "empty" / "adapter_model.safetensors").string());
  check_throws<format_error>(
      [&] {
        (void)(io::merge_files((dir / "base.safetensors").string(), (dir / "empty").string(),
                               out.string()));
      },
      "no tensors");

  io::AdapterFolder<float> both = small_lora(4);
  both.full_tensors["model.q.weight"] = io::FullTensor<float>{{4, 3}, Vector<float>::Ones(12)};
  both.save((dir / "both").string());
  check_throws<format_error>(
      [&] {
        (void)(io::merge_files((dir / "base.safetensors").string(), (dir / "both").string(),
                               out.string()));
      },
      "modules_to_save");
  CHECK_FALSE(fs::exists(out));
  fs::remove_all(dir);
}

#ifndef PEFT_TEST_SANITIZED  // the sanitizers reserve address space: no cap would hold
TEST_CASE("running out of memory while loading is an io_error, not std::bad_alloc",
          "[io][hostile]") {
  // A 40 MB F16 modules_to_save tensor read as double needs 160 MB; the child process gets 64 MB
  // of address space beyond what it already uses.
  io::SafetensorsWriter w;
  const Vector<float> big = Vector<float>::Zero(20'000'000);
  w.add_raw("base_model.model.lm_head.weight", io::Dtype::f16, {20'000'000}, big.data());
  std::string bytes = w.serialize();
  const pid_t child = ::fork();
  if (child == 0) {
    long pages = 0;
    std::ifstream("/proc/self/statm") >> pages;
    const rlim_t cap = rlim_t(pages) * rlim_t(::sysconf(_SC_PAGESIZE)) + (rlim_t(64) << 20);
    const rlimit lim{cap, cap};
    ::setrlimit(RLIMIT_AS, &lim);
    try {
      (void)io::AdapterFolder<double>::from_buffers(R"({"peft_type":"LORA","r":2})",
                                                    std::move(bytes));
    } catch (const io_error&) {
      ::_exit(0);
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
#endif

TEST_CASE("names with control bytes print whole", "[io][hostile]") {
  CHECK(io::detail::printable(std::string("a\0b\n", 4)) == "a\\x00b\\x0a");
  const std::string name("base_model.model.x\0y.lora_A.weight", 34);
  io::SafetensorsWriter w;
  w.add(name, RowMatrix<float>::Ones(2, 2));
  check_throws<format_error>(
      [&] {
        (void)(io::AdapterFolder<float>::from_buffers(R"({"peft_type":"LORA","r":2})",
                                                      w.serialize()));
      },
      "x\\x00y");
}

// Not run by default ("[.fixture]"): ctest runs it to write the folder that the tool test
// tool_inspect_20k_modules hands to peft-inspect (whose dtype table was O(tensors x modules)).
TEST_CASE("write a 20,000-module adapter folder for peft-inspect", "[.fixture]") {
  const char* out = std::getenv("PEFT_HOSTILE_FIXTURE_DIR");
  REQUIRE(out != nullptr);
  fs::create_directories(out);
  spit(fs::path(out) / "adapter_config.json", R"({"peft_type":"LORA","r":2,"lora_alpha":4})");
  spit(fs::path(out) / "adapter_model.safetensors", zero_byte_lora_tensors(20000));
  CHECK(io::AdapterFolder<float>::load(out).modules.size() == 20000);
}
