// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Exception types and the text of the messages users see (messages are part of the API).
#include <stdexcept>
#include <string>

// Internal invariants throw here, so a violated PEFT_ASSERT is observable (Eigen's
// VERIFY_RAISES_ASSERT idea).
struct assertion_failure : std::logic_error {
  using std::logic_error::logic_error;
};
#define PEFT_ASSERT(cond, msg) \
  ((cond) ? void(0) : throw assertion_failure(std::string("PEFT_ASSERT: ") + (msg)))

#include "support/test_support.hpp"

using namespace peft_test;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

TEST_CASE("Every exception is a peft::error and the fitting standard exception", "[errors]") {
  STATIC_REQUIRE(std::is_base_of_v<std::invalid_argument, peft::dimension_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::invalid_argument, peft::config_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::logic_error, peft::state_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, peft::format_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, peft::io_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, peft::numerical_error>);
  try {
    PEFT_THROW(peft::format_error("bad header"));
  } catch (const peft::error& e) {
    REQUIRE(std::string(e.what()) == "bad header");
  }
  try {
    PEFT_THROW(peft::io_error("disk full"));
  } catch (const std::exception& e) {
    REQUIRE(std::string(e.what()) == "disk full");
  }
}

TEST_CASE("The shape message names method, operand, both numbers and both shapes", "[errors]") {
  const auto w = random_matrix<float>(4096, 1024, 1, 0.01);
  peft::LoraLinear<float> lora(peft::frozen(w), peft::LoraOptions{});
  const auto x = random_matrix<float>(32, 768, 2);
  peft::RowMatrix<float> y(32, 4096);
  peft::Workspace<float> ws;
  REQUIRE_THROWS_WITH(lora.forward(x, y, ws),
                      "LoraLinear::forward(): x has 768 columns, expected in_features = 1024 "
                      "(x is 32x768, W is 4096x1024)");
}

TEST_CASE("Invalid LoRA options throw config_error naming the option and the shapes",
          "[errors][lora]") {
  const auto w = random_matrix<double>(6, 5, 1);
  peft::LoraOptions o;
  o.r = 0;
  REQUIRE_THROWS_AS(peft::LoraLinear<double>(peft::frozen(w), o), peft::config_error);
  REQUIRE_THROWS_WITH(
      peft::LoraLinear<double>(peft::frozen(w), o),
      StartsWith("LoraLinear::LoraLinear(): r = 0 must be > 0") && Contains("W is 6x5"));
  o.r = -3;
  REQUIRE_THROWS_AS(peft::LoraLinear<double>(peft::frozen(w), o), peft::config_error);
  o.r = 6;  // r > min(out, in) is accepted, as PEFT does
  REQUIRE_NOTHROW(peft::LoraLinear<double>(peft::frozen(w), o));
  o.r = 2;
  for (double p : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    o.lora_dropout = p;
    REQUIRE_THROWS_AS(peft::LoraLinear<double>(peft::frozen(w), o), peft::config_error);
  }
  o.lora_dropout = 0.0;
  REQUIRE_THROWS_WITH(peft::LoraLinear<double>(peft::frozen(w),
                                               [] {
                                                 peft::LoraOptions bad;
                                                 bad.r = 2;
                                                 bad.lora_dropout = 1.0;
                                                 return bad;
                                               }()),
                      Contains("lora_dropout = 1.000000 must be in [0, 1)"));
  for (double alpha :
       {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    o.lora_alpha = alpha;
    REQUIRE_THROWS_AS(peft::LoraLinear<double>(peft::frozen(w), o), peft::config_error);
    REQUIRE_THROWS_WITH(peft::LoraLinear<double>(peft::frozen(w), o), Contains("lora_alpha"));
  }
}

TEST_CASE("A bias of the wrong length is refused", "[errors][lora]") {
  const auto w = random_matrix<double>(6, 5, 1);
  const peft::Vector<double> b(5);
  peft::LoraOptions o;
  o.r = 2;
  REQUIRE_THROWS_WITH(peft::LoraLinear<double>(peft::frozen(w), peft::frozen_bias(b), o),
                      Contains("bias has 5 entries, expected out_features = 6"));
}

TEST_CASE("Outputs that overlap inputs are refused", "[errors][lora]") {
  peft::RowMatrix<double> buffer = random_matrix<double>(4, 6, 1);
  const auto w = random_matrix<double>(6, 6, 2);
  peft::LoraOptions o;
  o.r = 2;
  peft::LoraLinear<double> lora(peft::frozen(w), o);
  peft::Workspace<double> ws;
  REQUIRE_THROWS_WITH(lora.forward(buffer, buffer, ws), Contains("y overlaps x"));
}

TEST_CASE("Bad raw views are refused", "[errors][types]") {
  std::vector<float> data(20);
  REQUIRE_THROWS_AS(peft::frozen(data.data(), 4, 5, 3), peft::dimension_error);
  REQUIRE_THROWS_WITH(peft::frozen(data.data(), 4, 5, 3), Contains("leading dimension 3"));
  REQUIRE_THROWS_AS(peft::frozen(static_cast<const float*>(nullptr), 4, 5), peft::dimension_error);
  REQUIRE_NOTHROW(peft::frozen(data.data(), 4, 5));
}

TEST_CASE("Workspace rejects a non-binary dropout mask", "[errors][workspace]") {
  peft::Workspace<float> ws;
  peft::RowMatrix<float> keep = peft::RowMatrix<float>::Constant(2, 2, 0.5f);
  REQUIRE_THROWS_AS(ws.set_dropout_mask(keep), peft::config_error);
}

TEST_CASE("Internal invariants are observable when PEFT_ASSERT throws", "[errors][assert]") {
  peft::Workspace<float> ws;
  REQUIRE_THROWS_AS(ws.buffer(peft::Workspace<float>::num_slots, 1, 1), assertion_failure);
}
