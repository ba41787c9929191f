// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The method axis is open: a method defined only here — the adapter shell AdapterBase with its
// maths, and one file codec — attaches through AdapterSet, trains under train::BasicRecipe,
// saves a PEFT-style folder, loads it back and merges through io::merge_files, the function
// peft-merge calls, with nothing in include/ knowing it.
#include "support/test_support.hpp"

#include <peft/io.hpp>
#include <peft/train/recipe.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace toy {

using peft::Index;

struct OuterOptions {
  double scale = 1.0;      ///< s
  std::uint64_t seed = 0;  ///< init stream of v when no Rng is passed
};

/**
 * A rank-1 adapter y = x Wᵀ + b + s (x v) uᵀ with u `[out]` (zero at init, so the adapter starts
 * as a no-op) and v `[in]` (drawn N(0, 1/in)). parameters() = [u | v].
 */
template <typename Scalar_, int WeightOrder_ = Eigen::RowMajor>
class OuterLinear : public peft::AdapterBase<OuterLinear<Scalar_, WeightOrder_>> {
 public:
  PEFT_ADAPTER_INTERFACE(OuterLinear, OuterOptions);
  PEFT_ADAPTER_SEEDED_CONSTRUCTORS(OuterLinear)

  Scalar scaling() const noexcept { return Scalar(options_.scale); }
  Eigen::Map<peft::Vector<Scalar>> u() noexcept { return {this->storage_.data(), out_features()}; }
  Eigen::Map<const peft::Vector<Scalar>> u() const noexcept {
    return {this->storage_.data(), out_features()};
  }
  Eigen::Map<peft::Vector<Scalar>> v() noexcept {
    return {this->storage_.data() + out_features(), in_features()};
  }
  Eigen::Map<const peft::Vector<Scalar>> v() const noexcept {
    return {this->storage_.data() + out_features(), in_features()};
  }

 private:
  void initialize(peft::Rng& rng) {
    if (!(options_.scale > 0 && std::isfinite(options_.scale))) {
      PEFT_THROW(peft::config_error("OuterLinear: scale = " + std::to_string(options_.scale) +
                                    " must be positive and finite"));
    }
    this->storage_ = peft::detail::ParameterStorage<Scalar>(out_features() + in_features());
    u().setZero();
    rng.fill_normal(v(), 0.0, 1.0 / std::sqrt(double(in_features())));
  }

  void add_delta_impl(const ConstRef& x, Ref y, peft::Workspace<Scalar>&) const {
    y.noalias() += (scaling() * (x * v())) * u().transpose();
  }
  // grad_u = s dyᵀ (x v), grad_v = s xᵀ (dy u); returns dy u for the input gradient.
  Matrix parameter_gradients_impl(const ConstRef& x, const ConstRef& dy, GradientRef grad,
                                  peft::Workspace<Scalar>&) const {
    const peft::Vector<Scalar> t = x * v();
    Matrix w = dy * u();
    grad.head(out_features()).noalias() += scaling() * (dy.transpose() * t);
    grad.tail(in_features()).noalias() += scaling() * (x.transpose() * w);
    return w;
  }
  auto input_gradient_term(const ConstRef&, const ConstRef&, const Matrix& w,
                           peft::Workspace<Scalar>&) const {
    return Base::low_rank_term(w, Matrix(v().transpose()), scaling());
  }
  auto merge_term() const {
    return Base::low_rank_term(Matrix(u()), Matrix(v().transpose()), scaling());
  }
  void delta_weight_impl(WeightMatrix& delta) const {
    delta.noalias() = scaling() * (u() * v().transpose());
  }

  OuterOptions options_;
};

namespace io = peft::io;

/// The file codec of OuterLinear: peft_type "OUTER", its one config field "outer_scale" (kept in
/// AdapterConfig::extra, as any codec outside peft keeps its fields), and per module the tensors
/// "<m>.outer_u" [out] and "<m>.outer_v" [in].
struct OuterCodec : io::CodecDefaults {
  static constexpr io::PeftType type{"OUTER"};

  static double scale_of(const io::AdapterConfig& c) {
    const auto it = c.extra.find("outer_scale");
    return it != c.extra.end() && it->is_number() ? it->get<double>() : 1.0;
  }
  static void parse_config(const io::detail::ConfigReader& in, io::AdapterConfig&) {
    double s = 1.0;
    in.number("outer_scale", s);  // a format_error naming the field if it is not a number
  }
  static void validate(const io::AdapterConfig& c, const std::string& label) {
    if (!(scale_of(c) > 0)) io::detail::config_invalid(label, "outer_scale must be positive");
  }
  static std::string dump(const io::AdapterConfig& c, nlohmann::json doc) {
    doc["outer_scale"] = scale_of(c);
    return doc.dump(2);
  }
  static double scaling(const io::AdapterConfig& c, const std::string&) { return scale_of(c); }

  static constexpr std::array<io::TensorPart, 2> parts = {
      io::TensorPart{".outer_u", io::TensorSlot::other, false},
      io::TensorPart{".outer_v", io::TensorSlot::other, false}};

  template <typename Scalar>
  static void check_folder(const peft::io::SafetensorsReader& file, io::AdapterFolder<Scalar>& f,
                           const io::LoadOptions&) {
    for (auto& m : f.modules) {
      io::detail::require_part(file, m.name, m.other.count(".outer_u") != 0, ".outer_u");
      io::detail::require_part(file, m.name, m.other.count(".outer_v") != 0, ".outer_v");
      m.out = m.other.at(".outer_u").rows();
      m.in = m.other.at(".outer_v").rows();
      m.rank = 1;
      m.scaling = scale_of(f.config);
    }
  }
  template <typename Scalar>
  static void check_save(const io::AdapterFolder<Scalar>& f) {
    for (const auto& m : f.modules) {
      if (m.other.count(".outer_u") == 0 || m.other.count(".outer_v") == 0)
        PEFT_THROW(peft::dimension_error("OuterCodec: module '" + m.name + "' lacks u or v"));
    }
  }
  template <typename Scalar>
  static void write(io::SafetensorsWriter& w, const io::AdapterFolder<Scalar>& f,
                    peft::io::Dtype dtype) {
    for (const auto& m : f.modules) {
      for (const auto& part : parts) {
        const peft::Vector<Scalar> v = m.other.at(part.suffix).col(0);
        w.add_vector(io::module_key_prefix + m.name + part.suffix, v, dtype);
      }
    }
  }

  template <typename Scalar, int Order>
  using Adapter = OuterLinear<Scalar, Order>;

  template <typename Scalar, int Order>
  static io::AdapterFolder<Scalar> to_folder(
      const peft::AdapterSet<OuterLinear<Scalar, Order>>& set, io::AdapterConfig config) {
    const auto names = set.adapted_modules();
    config.peft_type = type;
    config.extra["outer_scale"] = set.adapter(names.at(0)).options().scale;
    config.target_modules = names;
    io::AdapterFolder<Scalar> folder;
    for (const auto& name : names) {
      const auto& a = set.adapter(name);
      if (a.options().scale != scale_of(config))
        PEFT_THROW(peft::config_error("OuterCodec: '" + name + "' has another scale"));
      io::ModuleTensors<Scalar> m;
      m.name = name;
      m.rank = 1;
      m.scaling = a.options().scale;
      m.out = a.out_features();
      m.in = a.in_features();
      m.other[".outer_u"] = a.u();
      m.other[".outer_v"] = a.v();
      folder.modules.push_back(std::move(m));
    }
    folder.config = std::move(config);
    io::detail::sort_by_name(folder.modules);
    return folder;
  }

  template <typename Scalar, int Order, typename FileScalar>
  static void apply(const io::AdapterFolder<FileScalar>& folder,
                    peft::AdapterSet<OuterLinear<Scalar, Order>>& set) {
    using A = OuterLinear<Scalar, Order>;
    io::detail::rebuild(folder, set, [&](const auto& m, const auto& mod) {
      OuterOptions o;
      o.scale = scale_of(folder.config);
      auto adapter = std::make_unique<A>(mod.weight, mod.bias, o);
      adapter->u() = m.other.at(".outer_u").col(0).template cast<Scalar>();
      adapter->v() = m.other.at(".outer_v").col(0).template cast<Scalar>();
      return adapter;
    });
  }
};

/// What peft-merge would pass for a world with this method in it.
using Codecs = io::detail::with_codec_t<io::BuiltinCodecs, OuterCodec>;

}  // namespace toy

PEFT_NAMESPACE_BEGIN
namespace io {
template <typename Scalar, int Order>
struct codec_for<toy::OuterLinear<Scalar, Order>> {
  using type = toy::OuterCodec;
};
}  // namespace io
PEFT_NAMESPACE_END

namespace {

using peft::Index;
using Mat = peft::RowMatrix<double>;
using toy::OuterLinear;
namespace fs = std::filesystem;

fs::path fresh_dir(const char* name) {
  const fs::path dir = fs::temp_directory_path() / name;
  fs::remove_all(dir);
  return dir;
}

}  // namespace

TEST_CASE("open axis: a toy adapter's gradients match finite differences", "[open_axis]") {
  const Mat w = peft_test::random_matrix<double>(5, 4, peft_test::seed_weights);
  const peft::Vector<double> b = peft_test::random_vector<double>(5, 3);
  toy::OuterOptions o;
  o.scale = 0.7;
  OuterLinear<double> a(peft::frozen(w), peft::frozen_bias(b), o);
  peft::Rng(5).fill_normal(a.parameters(), 0.0, 0.5);  // u = 0 at init would hide dv
  const Mat x = peft_test::random_matrix<double>(3, 4, peft_test::seed_inputs);
  const Mat c = peft_test::random_matrix<double>(3, 5, 9);  // loss = Σ c ⊙ y
  peft::Workspace<double> ws;
  auto loss = [&] {
    Mat y(3, 5);
    a.forward(x, y, ws);
    return (y.array() * c.array()).sum();
  };
  peft::Vector<double> grad = peft::Vector<double>::Zero(a.num_parameters());
  Mat dx(3, 4);
  a.backward(x, c, dx, grad, ws);
  CHECK(peft_test::max_fd_error(a.parameters().data(), a.num_parameters(), grad.data(), loss) <
        peft_test::fd_tolerance);
  Mat xv = x;
  peft::Vector<double> dx_flat = Eigen::Map<const peft::Vector<double>>(dx.data(), dx.size());
  auto loss_x = [&] {
    Mat y(3, 5);
    a.forward(xv, y, ws);
    return (y.array() * c.array()).sum();
  };
  CHECK(peft_test::max_fd_error(xv.data(), xv.size(), dx_flat.data(), loss_x) <
        peft_test::fd_tolerance);
  // ΔW as a dense matrix and as the merge kernel writes it agree.
  Mat merged = w;
  OuterLinear<double> m(peft::frozen(merged), o);
  m.parameters() = a.parameters();
  REQUIRE(m.merge_into(merged));
  CHECK(peft_test::relative_error(merged, Mat(w + a.delta_weight())) < 1e-14);
}

TEST_CASE("open axis: attach, train, save, load and merge a method defined only in tests",
          "[open_axis][io]") {
  // A one-layer regression whose target is reachable by a rank-1 update of W.
  const Index in = 6, out = 4, n = 32;
  std::map<std::string, Mat> weights = {
      {"model.layers.0.proj", peft_test::random_matrix<double>(out, in, peft_test::seed_weights)},
      {"model.layers.1.proj",
       peft_test::random_matrix<double>(out, in, peft_test::seed_weights + 1)}};
  const Mat x = peft_test::random_matrix<double>(n, in, peft_test::seed_inputs);
  const peft::Vector<double> u_star = peft_test::random_vector<double>(out, 21);
  const peft::Vector<double> v_star = peft_test::random_vector<double>(in, 22);
  auto target = [&](const std::string& name) {
    return Mat(x * (weights.at(name) + u_star * v_star.transpose()).transpose());
  };

  peft::AdapterSet<OuterLinear<double>> set;
  for (auto& [name, w] : weights) set.add_module(name, w);
  toy::OuterOptions options;
  options.scale = 0.5;
  peft::train::BasicRecipe<OuterLinear<double>> recipe(options, 3);
  recipe.attach(set);
  REQUIRE(set.adapted_modules().size() == 2);

  auto loss = [&] {
    double l = 0;
    for (const auto& name : set.adapted_modules()) {
      Mat y(n, out);
      set.adapter(name).forward(x, y, set.workspace(name));
      l += (y - target(name)).squaredNorm() / double(n);
    }
    return l;
  };
  const double loss_at_start = loss();
  {
    peft::optim::AdamWOptions o;
    o.weight_decay = 0.0;
    peft::optim::AdamW<double> optimizer(o);
    set.register_with(optimizer);
    set.zero_grad();
    for (long step = 1; step <= 200; ++step) {
      for (const auto& name : set.adapted_modules()) {
        Mat y(n, out);
        set.adapter(name).forward(x, y, set.workspace(name));
        const Mat dy = 2.0 * (y - target(name)) / double(n);
        set.adapter(name).backward(x, dy, set.gradient(name), set.workspace(name));
      }
      recipe.before_optimizer_step();
      optimizer.step(2e-2);
      recipe.after_optimizer_step(optimizer.step_count());
      optimizer.zero_grad();
    }
  }
  recipe.finish();
  const double loss_at_end = loss();
  CHECK(loss_at_end < 0.05 * loss_at_start);

  // Save through the generic save_adapter, which finds the codec by codec_for<OuterLinear>.
  const fs::path dir = fresh_dir("peft_open_axis_adapter");
  peft::io::AdapterConfig config;
  config.base_model_name_or_path = "toy";
  peft::io::save_adapter(dir.string(), set, config, peft::io::Dtype::f64);  // exact round trip
  {
    std::ifstream cfg(dir / peft::io::config_file_name);
    const std::string text((std::istreambuf_iterator<char>(cfg)), std::istreambuf_iterator<char>());
    CHECK(text.find("\"peft_type\": \"OUTER\"") != std::string::npos);
    CHECK(text.find("\"outer_scale\": 0.5") != std::string::npos);
  }
  const peft::io::SafetensorsReader file((dir / peft::io::weights_file_name).string());
  CHECK(file.info("base_model.model.model.layers.0.proj.outer_u").numel() == out);
  CHECK(file.info("base_model.model.model.layers.0.proj.outer_v").numel() == in);

  // Load back into a fresh set: the same parameters.
  std::map<std::string, Mat> copies = weights;
  peft::AdapterSet<OuterLinear<double>> loaded;
  for (auto& [name, w] : copies) loaded.add_module(name, w);
  const auto folder = peft::io::load_adapter(dir.string(), loaded);
  CHECK(folder.config.peft_type == toy::OuterCodec::type);
  CHECK(folder.modules.at(0).out_features() == out);
  CHECK(folder.modules.at(0).in_features() == in);
  for (const auto& name : set.adapted_modules()) {
    REQUIRE(loaded.has_adapter(name));
    CHECK(loaded.adapter(name).parameters() == set.adapter(name).parameters());
  }
  // A folder of this method is not silently read as another: LoRA sets refuse it by type.
  peft::AdapterSet<peft::LoraLinear<double>> lora;
  for (auto& [name, w] : copies) lora.add_module(name, w);
  CHECK_THROWS_AS(peft::io::load_adapter(dir.string(), lora), peft::format_error);

  // Merge the folder into a base safetensors through the function peft-merge calls.
  const fs::path base = dir.parent_path() / "peft_open_axis_base.safetensors";
  const fs::path merged = dir.parent_path() / "peft_open_axis_merged.safetensors";
  {
    peft::io::SafetensorsWriter wr;
    for (const auto& [name, w] : weights) wr.add(name + ".weight", w, peft::io::Dtype::f64);
    wr.save(base.string());
  }
  CHECK_THROWS_AS(peft::io::merge_files(base.string(), dir.string(), merged.string()),
                  peft::format_error);  // the built-in list does not know OUTER
  const auto report =
      peft::io::merge_files<toy::Codecs>(base.string(), dir.string(), merged.string());
  CHECK(report.modules.size() == 2);
  const peft::io::SafetensorsReader result(merged.string());
  for (const auto& name : loaded.adapted_modules()) {
    const Mat wm = result.matrix<double>(name + ".weight");
    Mat unmerged(n, out), through(n, out);
    loaded.adapter(name).forward(x, unmerged, loaded.workspace(name));
    through = x * wm.transpose();
    CHECK(peft_test::relative_error(through, unmerged) < 1e-12);
  }
  fs::remove_all(dir);
  fs::remove(base);
  fs::remove(merged);
}

TEST_CASE("open axis: the toy codec's config errors name the field; built-ins do not read it",
          "[open_axis][io]") {
  namespace io = peft::io;
  const std::string good = R"({"peft_type": "OUTER", "outer_scale": 0.25})";
  const auto c = io::AdapterConfig::parse<toy::Codecs>(good);
  CHECK(c.peft_type == toy::OuterCodec::type);
  CHECK(c.scaling_for<toy::Codecs>("any") == 0.25);
  CHECK(io::AdapterConfig::parse<toy::Codecs>(c.dump<toy::Codecs>()).extra == c.extra);
  try {
    (void)io::AdapterConfig::parse<toy::Codecs>(R"({"peft_type": "OUTER", "outer_scale": "x"})");
    FAIL("a string outer_scale was accepted");
  } catch (const peft::format_error& e) {
    CHECK(std::string(e.what()).find("\"outer_scale\" must be a number") != std::string::npos);
  }
  CHECK_THROWS_AS(
      io::AdapterConfig::parse<toy::Codecs>(R"({"peft_type": "OUTER", "outer_scale": -1})"),
      peft::format_error);
  try {
    (void)io::AdapterConfig::parse(good);
    FAIL("the built-in codecs read OUTER");
  } catch (const peft::format_error& e) {
    CHECK(std::string(e.what()).find("is \"OUTER\"; peft reads LORA, ADALORA and VERA") !=
          std::string::npos);
  }
}
