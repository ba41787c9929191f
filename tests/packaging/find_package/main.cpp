// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// A minimal peft consumer: it only has to find the headers, compile and link.
#include <peft/peft.hpp>

#include <cstdio>

int main() {
  std::printf("peft %s\n", peft::version_string());
  return 0;
}
