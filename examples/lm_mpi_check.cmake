# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# example_lm_mpi: peft-lm finetune on 1 rank and under mpirun on 2 ranks (each half of every
# batch) must end at the same held-out bits/char; rank 0's adapter folder must load.
#   cmake -DLAUNCH=<mpirun -n 2 ...> -DPEFT_LM=<peft-lm> -DBASE=<tiny base> -DWORK=<dir>
#         -P lm_mpi_check.cmake
cmake_minimum_required(VERSION 3.16)
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
# --lr 3e-2: large enough that the held-out bits/char moves by ~70e-4 in 20 steps, so a 2e-4
# agreement says something.
set(_args finetune --base ${BASE} --method lora --target all --steps 20 --batch 4 --lr 3e-2
  --eval-bytes 4096 --quiet)

function(run what out_var)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out
    TIMEOUT 240)
  message(STATUS "${what}: exit ${_rc}\n${_out}")
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${what} failed")
  endif()
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

function(bits_after text out_var)
  if(NOT text MATCHES "held-out bits/char after: +([0-9.]+)")
    message(FATAL_ERROR "no 'held-out bits/char after' line")
  endif()
  set(${out_var} ${CMAKE_MATCH_1} PARENT_SCOPE)
endfunction()

run("1 rank" _one ${PEFT_LM} ${_args} --out ${WORK}/one)
run("2 ranks" _two ${LAUNCH} ${PEFT_LM} ${_args} --out ${WORK}/two)
if(NOT _two MATCHES "data-parallel over 2 ranks")
  message(FATAL_ERROR "the 2-rank run did not run data-parallel")
endif()
bits_after("${_one}" _a)
bits_after("${_two}" _b)
# |a - b| <= 2e-4, in integer units of 1e-4 (the lines print 4 decimals)
string(REPLACE "." "" _ai "${_a}")
string(REPLACE "." "" _bi "${_b}")
math(EXPR _d "${_ai} - ${_bi}")
if(_d GREATER 2 OR _d LESS -2)
  message(FATAL_ERROR "held-out bits/char: ${_a} on 1 rank, ${_b} on 2 ranks")
endif()
if(NOT EXISTS "${WORK}/two/adapter_config.json" OR NOT EXISTS "${WORK}/two/adapter_model.safetensors")
  message(FATAL_ERROR "rank 0 did not write the adapter folder")
endif()
run("eval of the 2-rank folder" _eval ${PEFT_LM} eval --base ${BASE} --adapter ${WORK}/two
  --eval-bytes 4096)
message(STATUS "held-out bits/char: ${_a} on 1 rank, ${_b} on 2 ranks")
