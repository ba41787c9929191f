// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Per-row adapters in the language model (peft-lm serve-batch): every projection runs through
// its module's bank of a peft::AdapterBankSet, and each sequence of the batch names its adapter's
// slot (or -1, the base alone). One batched forward serves every adapter at once.
#pragma once
#include "cli.hpp"
#include "transformer.hpp"

#include <peft/bank_set.hpp>
#include <peft/error.hpp>
#include <peft/io/adapter_folder.hpp>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace examples::lm {

/// Registers every projection of `weights` (dense, viewed) with `set` under its module name.
template <typename Scalar>
void register_banks(peft::AdapterBankSet<Scalar>& set, const Weights<Scalar>& weights) {
  for (Index l = 0; l < weights.cfg.layers; ++l)
    for (int p = 0; p < num_projs; ++p)
      set.add_module(module_name(l, p), peft::frozen(weights.proj(l, p)));
}

/**
 * The projections through a peft::AdapterBankSet: sequence s of the batch (its `length` rows)
 * uses slot ids[s] in every projection, −1 the base layer. Forward only (serving); one object
 * per thread (it holds the ids and the workspace), the set shared.
 */
template <typename Scalar>
class BankLinears {
 public:
  using Mat = peft::RowMatrix<Scalar>;

  BankLinears(const peft::AdapterBankSet<Scalar>& set, const Weights<Scalar>& weights) : set_(set) {
    for (Index l = 0; l < weights.cfg.layers; ++l)
      for (int p = 0; p < num_projs; ++p) modules_.push_back(set.module_index(module_name(l, p)));
  }

  /// The adapter slot of each sequence of the next forward, whose sequences have `length` rows.
  void set_sequences(const std::vector<int>& sequence_ids, Index length) {
    rows_.clear();
    for (const int id : sequence_ids)
      rows_.insert(rows_.end(), static_cast<std::size_t>(length), id);
  }

  void forward(Index layer, int p, const Mat& x, Mat& y) {
    const std::size_t module = modules_[static_cast<std::size_t>(layer * num_projs + p)];
    y.resize(x.rows(), set_.bank(module).out_features());
    set_.forward(module, x, rows_, y, ws_);
  }

 private:
  const peft::AdapterBankSet<Scalar>& set_;
  std::vector<std::size_t> modules_;
  std::vector<int> rows_;
  peft::Workspace<Scalar> ws_;
};

/// "0,1,-1" → {0, 1, -1}; every entry an integer.
inline std::vector<int> parse_ids(const std::string& list) {
  std::vector<int> ids;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t used = 0;
    int id = 0;
    bool ok = !item.empty();
    if (ok) {
      try {
        id = std::stoi(item, &used);
      } catch (const std::exception&) {
        ok = false;
      }
    }
    if (!ok || used != item.size()) {
      PEFT_THROW(peft::config_error("--ids: '" + item + "' is not an integer (use e.g. 0,1,-1)"));
    }
    ids.push_back(id);
  }
  return ids;
}

/// "a,b" → {"a", "b"} (empty entries skipped).
inline std::vector<std::string> parse_list(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace examples::lm
