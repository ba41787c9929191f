# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Stages a fresh install of the build tree BUILD_DIR into PREFIX (ctest fixture packaging.install).
# cmake -DBUILD_DIR=<build> -DPREFIX=<prefix> [-DCONFIG=<config>] -P install.cmake
cmake_minimum_required(VERSION 3.16)
foreach(_var BUILD_DIR PREFIX)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "install.cmake: ${_var} is required")
  endif()
endforeach()

file(REMOVE_RECURSE "${PREFIX}")  # no stale headers from an earlier install
set(_cmd "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}")
if(CONFIG)
  list(APPEND _cmd --config "${CONFIG}")
endif()
execute_process(COMMAND ${_cmd} RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "install.cmake: '${_cmd}' failed (${_rc})")
endif()

file(GLOB_RECURSE _configs "${PREFIX}/*/peftConfig.cmake")
if(NOT _configs)
  message(FATAL_ERROR "install.cmake: no peftConfig.cmake under ${PREFIX}")
endif()
file(GLOB_RECURSE _headers "${PREFIX}/*/peft/version.hpp")
if(NOT _headers)
  message(FATAL_ERROR "install.cmake: no peft/version.hpp under ${PREFIX}")
endif()
message(STATUS "install.cmake: staged peft in ${PREFIX} (${_configs})")
