# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Configures, builds and runs one consumer project in a fresh binary directory.
#   cmake -DCONSUMER_SOURCE_DIR=... -DCONSUMER_BINARY_DIR=... -DCTEST_COMMAND=...
#         [-DGENERATOR=... -DGENERATOR_PLATFORM=... -DGENERATOR_TOOLSET=...]
#         [-DCXX_COMPILER=... -DCXX_FLAGS=... -DCONFIG=... -DEIGEN3_DIR=...]
#         [-DPREFIX_PATH=<staged install>]   find_package consumer: peft_DIR must lie under it
#         [-DPEFT_SOURCE_DIR=<peft source>]  add_subdirectory consumer
#         [-DEXPECTED_VERSION=x.y.z]         the consumer must print "peft x.y.z"
#         -P run_consumer.cmake
cmake_minimum_required(VERSION 3.16)
foreach(_var CONSUMER_SOURCE_DIR CONSUMER_BINARY_DIR CTEST_COMMAND)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: ${_var} is required")
  endif()
endforeach()

function(run_step what)
  execute_process(COMMAND ${ARGN}
    WORKING_DIRECTORY "${CONSUMER_BINARY_DIR}"
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "run_consumer.cmake: ${what} failed (${_rc}):\n${ARGN}\n${_out}")
  endif()
  set(step_output "${_out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${CONSUMER_BINARY_DIR}")
file(MAKE_DIRECTORY "${CONSUMER_BINARY_DIR}")

set(_configure "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${CONSUMER_BINARY_DIR}")
if(GENERATOR)
  list(APPEND _configure -G "${GENERATOR}")
endif()
if(GENERATOR_PLATFORM)
  list(APPEND _configure -A "${GENERATOR_PLATFORM}")
endif()
if(GENERATOR_TOOLSET)
  list(APPEND _configure -T "${GENERATOR_TOOLSET}")
endif()
if(CXX_COMPILER)
  list(APPEND _configure "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(DEFINED CXX_FLAGS)
  list(APPEND _configure "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}")
endif()
if(CONFIG)
  list(APPEND _configure "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
if(EIGEN3_DIR)
  list(APPEND _configure "-DEigen3_DIR=${EIGEN3_DIR}")
endif()
if(PREFIX_PATH)
  list(APPEND _configure "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
endif()
if(PEFT_SOURCE_DIR)
  list(APPEND _configure "-DPEFT_SOURCE_DIR=${PEFT_SOURCE_DIR}")
endif()
run_step("configure" ${_configure})

# The consumer must have used what we meant it to use.
file(STRINGS "${CONSUMER_BINARY_DIR}/CMakeCache.txt" _cache)
if(PREFIX_PATH)
  list(FILTER _cache INCLUDE REGEX "^peft_DIR:")
  string(REGEX REPLACE "^peft_DIR:[A-Z]+=" "" _peft_dir "${_cache}")
  get_filename_component(_prefix "${PREFIX_PATH}" REALPATH)
  get_filename_component(_peft_dir "${_peft_dir}" REALPATH)
  string(FIND "${_peft_dir}/" "${_prefix}/" _pos)
  if(NOT _pos EQUAL 0)
    message(FATAL_ERROR "run_consumer.cmake: peft was found at ${_peft_dir}, not in ${_prefix}")
  endif()
endif()
if(PEFT_SOURCE_DIR)
  # As a subproject, peft must not build its tests/examples nor add install rules.
  foreach(_opt PEFT_BUILD_TESTS PEFT_BUILD_EXAMPLES PEFT_BUILD_BENCHMARKS PEFT_INSTALL)
    set(_line "${_cache}")
    list(FILTER _line INCLUDE REGEX "^${_opt}:BOOL=")
    if(NOT _line MATCHES "=OFF$")
      message(FATAL_ERROR "run_consumer.cmake: as a subproject ${_opt} should default to OFF, got '${_line}'")
    endif()
  endforeach()
endif()

set(_build "${CMAKE_COMMAND}" --build "${CONSUMER_BINARY_DIR}")
if(CONFIG)
  list(APPEND _build --config "${CONFIG}")
endif()
run_step("build" ${_build})

set(_test "${CTEST_COMMAND}" --output-on-failure -V)  # in CONSUMER_BINARY_DIR
if(CONFIG)
  list(APPEND _test -C "${CONFIG}")
endif()
run_step("run" ${_test})
if(EXPECTED_VERSION)
  string(REPLACE "." "\\." _v "${EXPECTED_VERSION}")
  if(NOT step_output MATCHES "peft ${_v}")
    message(FATAL_ERROR "run_consumer.cmake: expected the consumer to print 'peft ${EXPECTED_VERSION}':\n${step_output}")
  endif()
endif()
string(REGEX MATCH "peft [0-9]+\\.[0-9]+\\.[0-9]+" _printed "${step_output}")
message(STATUS "run_consumer.cmake: ${CONSUMER_SOURCE_DIR} OK (the consumer printed '${_printed}')")
