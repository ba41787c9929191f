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

# How peft's tests and examples launch an MPI job (tests/mpi, examples/ under mpirun), in one place.
if(PEFT_HAS_MPI)
  # FindMPI gives the launcher and its -np flag; the
  # preflags make Open MPI run in containers and CI:
  #   --oversubscribe                              more ranks than cores (CI runners, 1-core VMs);
  #   --bind-to none                               no core pinning: tests share cores with others;
  #   --mca btl_vader_single_copy_mechanism none   shared memory without CMA/ptrace, which
  #                                                containers often forbid ("Read -1 ... errno 1").
  # The environment: Open MPI refuses to run as root (CI, containers) without the two variables.
  if(NOT DEFINED PEFT_MPIEXEC_PREFLAGS)
    set(_peft_preflags ${MPIEXEC_PREFLAGS})
    execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version
      OUTPUT_VARIABLE _peft_mpiexec_version ERROR_QUIET TIMEOUT 20)
    if(_peft_mpiexec_version MATCHES "Open MPI|OpenRTE")
      list(APPEND _peft_preflags --oversubscribe --bind-to none
        --mca btl_vader_single_copy_mechanism none)
    endif()
    set(PEFT_MPIEXEC_PREFLAGS "${_peft_preflags}" CACHE STRING
      "Flags mpirun gets before the program in peft's MPI tests")
  endif()
  set(PEFT_MPI_TEST_ENVIRONMENT OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
  # Under ASan + UBSan the MPI tests run too: Open MPI's own unreleased allocations are suppressed
  # by library (tests/mpi/lsan.supp says which and why); mpirun's children inherit the environment.
  if(PEFT_SANITIZE)
    list(APPEND PEFT_MPI_TEST_ENVIRONMENT
      "ASAN_OPTIONS=detect_leaks=1:strict_init_order=1:fast_unwind_on_malloc=0"
      "LSAN_OPTIONS=suppressions=${PROJECT_SOURCE_DIR}/tests/mpi/lsan.supp"
      "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
  endif()
  set(PEFT_MPI_LAUNCH ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 2 ${PEFT_MPIEXEC_PREFLAGS})
  message(STATUS "peft: MPI tests run as: ${PEFT_MPI_LAUNCH} <program> ${MPIEXEC_POSTFLAGS}")
endif()
