// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Umbrella header: everything public in one include.
#pragma once
#include <peft/adalora.hpp>
#include <peft/adapter.hpp>
#include <peft/adapter_set.hpp>
#include <peft/bank.hpp>
#include <peft/config.hpp>
#include <peft/dist/communicator.hpp>
#include <peft/dist/threads.hpp>
#include <peft/error.hpp>
#include <peft/init/eva.hpp>
#include <peft/init/lora_ga.hpp>
#include <peft/linalg/incremental_pca.hpp>
#include <peft/linalg/randomized_svd.hpp>
#include <peft/lora.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/random.hpp>
#include <peft/storage.hpp>
#include <peft/train/recipe.hpp>
#include <peft/types.hpp>
#include <peft/vera.hpp>
#include <peft/vera_bank.hpp>
#include <peft/version.hpp>
#include <peft/workspace.hpp>
