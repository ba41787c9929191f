# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# Runs COMMAND (a ;-list, e.g. mpirun -np 2 ... mpi_fail unwind) and passes only if it exits
# non-zero within TIMEOUT seconds and its output matches EXPECT: a job whose rank fails must
# stop with an error, fast, not hang and not succeed.
#   cmake -DCOMMAND=<list> -DTIMEOUT=<s> -DEXPECT=<regex> -P expect_failure.cmake
cmake_minimum_required(VERSION 3.16)
string(TIMESTAMP _start "%s")
execute_process(COMMAND ${COMMAND}
  TIMEOUT ${TIMEOUT}
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
string(TIMESTAMP _end "%s")
math(EXPR _seconds "${_end} - ${_start}")
message(STATUS "expect_failure: exit '${_rc}' after ${_seconds} s; output:\n${_out}")
if(_rc STREQUAL "0")
  message(FATAL_ERROR "expect_failure: the job succeeded; it had to fail")
endif()
if(_rc MATCHES "timeout|Process terminated due to timeout")
  message(FATAL_ERROR "expect_failure: the job still ran after ${TIMEOUT} s (a hang)")
endif()
if(NOT _out MATCHES "${EXPECT}")
  message(FATAL_ERROR "expect_failure: the output does not say '${EXPECT}'")
endif()
