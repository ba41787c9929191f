# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Options for peft's own targets (tests, examples, benchmarks); never for the INTERFACE target.
# Not installed.
include_guard(GLOBAL)

set(PEFT_WARNING_FLAGS -Wall -Wextra -Wpedantic -Wshadow)
set(PEFT_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)

if(PEFT_SANITIZE AND MSVC)
  message(FATAL_ERROR "PEFT_SANITIZE supports GCC and Clang only")
endif()

# peft_apply_dev_options(<target> [NO_SANITIZE])
#   ISO C++, warnings and (with PEFT_SANITIZE, unless NO_SANITIZE) ASan + UBSan on one of
#   peft's own targets.
function(peft_apply_dev_options target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "NO_SANITIZE" "" "")
  # Plain ISO C++ (-std=c++17, not gnu++17) so GNU extensions cannot creep into the headers.
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive-)
  else()
    target_compile_options(${target} PRIVATE ${PEFT_WARNING_FLAGS})
  endif()
  if(PEFT_SANITIZE AND NOT arg_NO_SANITIZE)
    target_compile_options(${target} PRIVATE ${PEFT_SANITIZE_FLAGS})
    get_target_property(_type ${target} TYPE)
    if(NOT _type STREQUAL "OBJECT_LIBRARY" AND NOT _type STREQUAL "STATIC_LIBRARY")
      target_link_options(${target} PRIVATE ${PEFT_SANITIZE_FLAGS})
    endif()
  endif()
endfunction()
