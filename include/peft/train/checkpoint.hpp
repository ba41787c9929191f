// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Training checkpoints of a recipe's run, with one worker or many: worker 0 writes and reads the
// file, the other workers get its bytes, so the file need only be on worker 0's filesystem.
#pragma once
#include <peft/io/checkpoint.hpp>
#include <peft/io/detail/fs.hpp>
#include <peft/train/recipe.hpp>

#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace train {

namespace detail {

/// A recipe with a RankAllocator (AdaLoRA) has it checkpointed: detected, no method named here.
template <typename Recipe, typename = void>
struct has_allocator : std::false_type {};
template <typename Recipe>
struct has_allocator<Recipe, std::void_t<decltype(std::declval<Recipe&>().allocator())>>
    : std::true_type {};

template <typename Recipe>
auto* allocator_of(Recipe& recipe) {
  if constexpr (has_allocator<Recipe>::value) {
    return &recipe.allocator();
  } else {
    using Adapter = typename Recipe::Adapter;
    return static_cast<RankAllocator<typename Adapter::Scalar, Adapter::WeightOrder,
                                     typename adapter_traits<Adapter>::Storage>*>(nullptr);
  }
}

template <typename Recipe>
void require_training(const Recipe& recipe, const char* what) {
  if (recipe.phase() != Phase::training) {
    PEFT_THROW(state_error(std::string("train::") + what +
                           "(): the recipe is not training (attach it, and finish calibrating, "
                           "first; a finished run has no training state left)"));
  }
}

/**
 * Runs `f` on worker 0 only; then every worker returns, or every worker throws: worker 0 its own
 * exception, the others io_error with worker 0's message. So a failed write or read ends the
 * collective call alike everywhere instead of leaving workers waiting in the next collective.
 */
template <typename F>
void on_worker_zero(dist::Communicator& comm, F&& f) {
  if (comm.size() == 1) {
    f();
    return;
  }
  std::string message;
#ifndef PEFT_NO_EXCEPTIONS
  std::exception_ptr failure;
  if (comm.rank() == 0) {
    try {
      f();
    } catch (const std::exception& e) {
      failure = std::current_exception();
      message = e.what();
    } catch (...) {
      failure = std::current_exception();
      message = "unknown exception";
    }
  }
#else
  if (comm.rank() == 0) f();
#endif
  std::int64_t length = message.empty() ? -1 : static_cast<std::int64_t>(message.size());
  comm.broadcast(&length, 1, 0);
  if (length < 0) return;
  message.resize(static_cast<std::size_t>(length));
  comm.broadcast(message.data(), length, 0);
#ifndef PEFT_NO_EXCEPTIONS
  if (failure) std::rethrow_exception(failure);
#endif
  PEFT_THROW(io_error("worker 0 failed: " + message));
}

/// The whole file at `path` (a regular file: a FIFO would block).
inline std::string read_all(const std::string& path) {
  const std::uintmax_t size = io::detail::require_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  std::string bytes(static_cast<std::size_t>(size), '\0');
  if (!in || !in.read(bytes.data(), static_cast<std::streamsize>(size))) {
    PEFT_THROW(io_error(path + ": cannot read " + std::to_string(size) + " bytes"));
  }
  return bytes;
}

constexpr const char* user_prefix = "user.";

/// Every worker's dropout streams ("workers modules" then 6 hex words per module, worker after
/// worker): each worker has its own (dropout_seed), so worker 0 cannot write them alone.
constexpr const char* dropout_key = "dropout.streams";
constexpr std::size_t stream_words = 6;  // 4 state words, the spare-normal flag and its bits

/// Collective: the streams of every worker's modules, registration order, in one string.
template <typename Set>
std::string gather_dropout_streams(const Set& set, dist::Communicator& comm) {
  const std::vector<std::string> names = set.module_names();
  const std::size_t per_worker = names.size() * stream_words;
  std::vector<std::int64_t> words(per_worker * static_cast<std::size_t>(comm.size()), 0);
  std::size_t at = per_worker * static_cast<std::size_t>(comm.rank());
  for (const auto& name : names) {
    const Rng::State s = set.module(name).workspace.dropout_stream();
    std::uint64_t spare = 0;
    std::memcpy(&spare, &s.spare_normal, sizeof spare);
    for (const std::uint64_t w : {s.words[0], s.words[1], s.words[2], s.words[3],
                                  std::uint64_t(s.has_spare_normal), spare}) {
      std::memcpy(&words[at++], &w, sizeof w);
    }
  }
  // A sum where every other worker adds 0: each worker's words arrive unchanged (integers).
  if (comm.size() > 1) comm.all_reduce_sum(words.data(), static_cast<Index>(words.size()));
  std::ostringstream out;
  out << comm.size() << ' ' << names.size() << std::hex;
  for (const std::int64_t w : words) out << ' ' << static_cast<std::uint64_t>(w);
  return out.str();
}

/// The streams of `worker` of `workers` from gather_dropout_streams' text, one per module;
/// empty when the checkpoint was taken on another worker count (its streams do not map here).
inline std::vector<Rng::State> parse_dropout_streams(const std::string& text, std::size_t modules,
                                                     int worker, int workers,
                                                     const std::string& path) {
  std::istringstream in(text);
  long saved_workers = 0;
  std::size_t saved_modules = 0;
  in >> saved_workers >> saved_modules >> std::hex;
  std::vector<std::uint64_t> words;
  for (std::uint64_t w = 0; in >> w;) words.push_back(w);
  if (!in.eof() || saved_workers < 1 || saved_modules != modules ||
      words.size() != static_cast<std::size_t>(saved_workers) * modules * stream_words) {
    PEFT_THROW(format_error(path + ": metadata " + dropout_key + " does not hold " +
                            std::to_string(modules) + " modules' dropout streams per worker"));
  }
  std::vector<Rng::State> streams;
  if (saved_workers != workers) return streams;
  std::size_t at = static_cast<std::size_t>(worker) * modules * stream_words;
  for (std::size_t m = 0; m < modules; ++m, at += stream_words) {
    Rng::State s{{words[at], words[at + 1], words[at + 2], words[at + 3]}, words[at + 4] != 0, 0.0};
    std::memcpy(&s.spare_normal, &words[at + 5], sizeof s.spare_normal);
    streams.push_back(s);
  }
  return streams;
}

}  // namespace detail

/**
 * Writes a checkpoint of `recipe`'s run at `path`, atomically: the adapters, AdamW's state, the
 * optimizer's step count and, for AdaLoRA, the kept masks and the allocator's score averages
 * (io::save_checkpoint's file), every worker's dropout streams, plus `metadata` (stored as
 * "user.<key>", e.g. the run's options, so a resume can check it continues the same run). Call it
 * between optimizer steps.
 *
 * Collective: every worker calls it; worker 0 writes (the replicas hold the same bits) and every
 * worker returns once the file is in place, or throws if worker 0 could not write it.
 */
template <typename Recipe>
void save_checkpoint(const std::string& path, const Recipe& recipe,
                     const optim::AdamW<typename Recipe::Scalar>& optimizer,
                     const std::map<std::string, std::string>& metadata = {}) {
  detail::require_training(recipe, "save_checkpoint");
  const std::string streams =
      detail::gather_dropout_streams(recipe.adapters(), recipe.communicator());
  detail::on_worker_zero(recipe.communicator(), [&] {
    auto file = io::detail::checkpoint_writer(recipe.adapters(), optimizer, optimizer.step_count(),
                                              detail::allocator_of(recipe));
    file.set_metadata(detail::dropout_key, streams);
    for (const auto& [key, value] : metadata) file.set_metadata(detail::user_prefix + key, value);
    file.save(path);
  });
}

/**
 * Restores a run from save_checkpoint's file into `recipe` and `optimizer`, built as the
 * checkpointed run built them: attached with the same options and, for LoRA-GA and EVA,
 * calibrated again on the same batches (calibration is deterministic; the checkpoint holds the
 * training state, not the initialisation). Everything is read and checked before anything
 * changes, `accept` too: it is called with the saved metadata first, and throws to refuse the
 * file (e.g. another run's options). Returns the optimizer steps taken; the next optimizer step
 * is that + 1. The saved metadata goes to `*metadata` when given.
 *
 * Each worker's dropout streams continue where they stood, so call enable_dropout(seed) before
 * this (after it, the streams would restart); with another worker count than the checkpoint's
 * they cannot map and stay as they are.
 *
 * Collective: worker 0 reads the file and broadcasts its bytes, so only worker 0 needs it. Any
 * worker count may resume any checkpoint (the global batch is what the run defines).
 */
template <typename Recipe>
long load_checkpoint(
    const std::string& path, Recipe& recipe, optim::AdamW<typename Recipe::Scalar>& optimizer,
    std::map<std::string, std::string>* metadata = nullptr,
    const std::function<void(const std::map<std::string, std::string>&)>& accept = {}) {
  detail::require_training(recipe, "load_checkpoint");
  dist::Communicator& comm = recipe.communicator();
  std::string bytes;
  if (comm.size() > 1) {
    detail::on_worker_zero(comm, [&] { bytes = detail::read_all(path); });
    std::int64_t size = static_cast<std::int64_t>(bytes.size());
    comm.broadcast(&size, 1, 0);
    bytes.resize(static_cast<std::size_t>(size));
    comm.broadcast(bytes.data(), size, 0);
  } else {
    bytes = detail::read_all(path);
  }
  const auto file = io::SafetensorsReader::from_buffer(std::move(bytes), path);
  // A recipe's step is its optimizer's (save_checkpoint writes both alike): checked first, so a
  // file written otherwise changes nothing.
  const auto& meta = file.metadata();
  const auto step_it = meta.find("step"), optimizer_it = meta.find("adamw.step");
  if (step_it != meta.end() && optimizer_it != meta.end() &&
      step_it->second != optimizer_it->second) {
    PEFT_THROW(format_error(path + ": step " + step_it->second + " is not the optimizer's step " +
                            optimizer_it->second + "; not a recipe's checkpoint"));
  }
  std::map<std::string, std::string> user;
  const std::string prefix = detail::user_prefix;
  for (const auto& [key, value] : meta)
    if (key.compare(0, prefix.size(), prefix) == 0) user[key.substr(prefix.size())] = value;
  const auto streams_it = meta.find(detail::dropout_key);
  const std::vector<Rng::State> streams =
      streams_it == meta.end()
          ? std::vector<Rng::State>{}
          : detail::parse_dropout_streams(streams_it->second, recipe.adapters().num_modules(),
                                          comm.rank(), comm.size(), path);
  if (accept) accept(user);
  const long step =
      io::load_checkpoint(file, recipe.adapters(), optimizer, detail::allocator_of(recipe));
  const std::vector<std::string> names = recipe.adapters().module_names();
  for (std::size_t m = 0; m < streams.size(); ++m)
    recipe.adapters().workspace(names[m]).restore_dropout_stream(streams[m]);
  recipe.resume_at(step);
  if (metadata) *metadata = std::move(user);
  return step;
}

}  // namespace train
PEFT_NAMESPACE_END
