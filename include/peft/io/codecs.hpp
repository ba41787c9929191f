// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// The built-in file codecs (the members of BuiltinCodecs, io/codec.hpp). Included at the end of
// io/adapter_folder.hpp, so any io header brings them all.
#pragma once
#include <peft/io/adalora.hpp>
#include <peft/io/lora.hpp>
#include <peft/io/vera.hpp>
