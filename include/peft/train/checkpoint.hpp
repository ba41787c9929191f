// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Training checkpoints of a recipe's run, with one worker or many: worker 0 writes and reads the
// file, the other workers get its bytes, so the file need only be on worker 0's filesystem.
#pragma once
#include <peft/io/checkpoint.hpp>
#include <peft/io/detail/fs.hpp>
#include <peft/train/recipe.hpp>

#include <cstdint>
#include <exception>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

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

}  // namespace detail

/**
 * Writes a checkpoint of `recipe`'s run at `path`, atomically: the adapters, AdamW's state, the
 * optimizer's step count and, for AdaLoRA, the kept masks and the allocator's score averages
 * (io::save_checkpoint's file), plus `metadata` (stored as "user.<key>", e.g. the run's options,
 * so a resume can check it continues the same run). Call it between optimizer steps.
 *
 * Collective: every worker calls it; worker 0 writes (the replicas hold the same bits) and every
 * worker returns once the file is in place, or throws if worker 0 could not write it.
 */
template <typename Recipe>
void save_checkpoint(const std::string& path, const Recipe& recipe,
                     const optim::AdamW<typename Recipe::Scalar>& optimizer,
                     const std::map<std::string, std::string>& metadata = {}) {
  detail::require_training(recipe, "save_checkpoint");
  detail::on_worker_zero(recipe.communicator(), [&] {
    auto file = io::detail::checkpoint_writer(recipe.adapters(), optimizer, optimizer.step_count(),
                                              detail::allocator_of(recipe));
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
  if (accept) accept(user);
  const long step =
      io::load_checkpoint(file, recipe.adapters(), optimizer, detail::allocator_of(recipe));
  recipe.resume_at(step);
  if (metadata) *metadata = std::move(user);
  return step;
}

}  // namespace train
PEFT_NAMESPACE_END
