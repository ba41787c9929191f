// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Umbrella header of the file formats (needs nlohmann-json; link peft::io in CMake).
#pragma once
#include <peft/bank_set.hpp>
#include <peft/io/adapter_config.hpp>
#include <peft/io/adapter_files.hpp>
#include <peft/io/adapter_folder.hpp>
#include <peft/io/checkpoint.hpp>
#include <peft/io/merge.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/peft.hpp>
