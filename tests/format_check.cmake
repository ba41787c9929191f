# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# ctest format_check: every C++ source of the project follows .clang-format.
#   cmake -DCLANG_FORMAT=<clang-format-14> -DSOURCE_DIR=<repo> -P format_check.cmake
# One clang-format version only (14, Debian 12's): other versions lay some constructs out
# differently, so a check that accepted any would flip with the machine.
foreach(_dir include src tests examples tools benchmarks fuzz)
  file(GLOB_RECURSE _found "${SOURCE_DIR}/${_dir}/*.hpp" "${SOURCE_DIR}/${_dir}/*.cpp")
  list(APPEND _files ${_found})
endforeach()
list(SORT _files)
list(LENGTH _files _count)
execute_process(
  COMMAND "${CLANG_FORMAT}" --dry-run --Werror --style=file ${_files}
  WORKING_DIRECTORY "${SOURCE_DIR}"
  RESULT_VARIABLE _result
  ERROR_VARIABLE _errors)
if(NOT _result EQUAL 0)
  string(REGEX MATCHALL "[^\n]*: error: code should be clang-formatted" _hits "${_errors}")
  list(REMOVE_DUPLICATES _hits)
  string(REPLACE ";" "\n" _hits "${_hits}")
  message(FATAL_ERROR "format_check: these files differ from .clang-format "
    "(fix with: ${CLANG_FORMAT} -i <file>):\n${_hits}")
endif()
message(STATUS "format_check: ${_count} files follow .clang-format")
