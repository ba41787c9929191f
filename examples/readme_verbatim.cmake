# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# ctest readme_quickstart_verbatim: README.md's quick start is examples/lora_quickstart.cpp,
# character for character, so the snippet a reader copies is the one CI compiles and runs.
#   cmake -DREADME=<README.md> -DSOURCE=<lora_quickstart.cpp> -P readme_verbatim.cmake
file(READ "${README}" _readme)
file(READ "${SOURCE}" _source)
string(FIND "${_readme}" "```cpp\n${_source}```" _at)
if(_at EQUAL -1)
  message(FATAL_ERROR "README.md's quick start differs from ${SOURCE}: paste the file into the "
    "```cpp block under '## Quick start'")
endif()
