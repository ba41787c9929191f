# SPDX-FileCopyrightText: The peft authors
# SPDX-License-Identifier: Apache-2.0
# example_lm_resume, example_lm_mpi_resume: for each method, `peft-lm finetune` run straight
# through (writing a checkpoint at step 7 of 12), then the same command with --resume, which
# continues from that checkpoint, must write the same adapter folder byte for byte. Under LAUNCH
# (mpirun) both runs are data-parallel and rank 0 writes. A resume with other options is refused.
#   cmake [-DLAUNCH=<mpirun -n 2 ...>] -DPEFT_LM=<peft-lm> -DBASE=<tiny base> -DWORK=<dir>
#         "-DMETHODS=lora;adalora" -P lm_resume_check.cmake
cmake_minimum_required(VERSION 3.16)
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

function(run what expect_ok out_var)
  execute_process(COMMAND ${LAUNCH} ${PEFT_LM} ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out
    ERROR_VARIABLE _out TIMEOUT 240)
  message(STATUS "${what}: exit ${_rc}\n${_out}")
  if(expect_ok AND NOT _rc EQUAL 0)
    message(FATAL_ERROR "${what} failed")
  elseif(NOT expect_ok AND _rc EQUAL 0)
    message(FATAL_ERROR "${what} succeeded; it should have been refused")
  endif()
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

foreach(_m ${METHODS})
  set(_args finetune --base ${BASE} --method ${_m} --target all --steps 12 --batch 4 --lr 2e-2
    --calibration-batches 2 --eval-bytes 2048 --checkpoint ${WORK}/${_m}.ckpt --checkpoint-every 7)
  run("${_m}, straight" TRUE _straight ${_args} --out ${WORK}/${_m}-straight)
  if(NOT EXISTS "${WORK}/${_m}.ckpt")
    message(FATAL_ERROR "${_m}: no checkpoint written")
  endif()
  run("${_m}, resumed" TRUE _resumed ${_args} --resume --out ${WORK}/${_m}-resumed)
  if(NOT _resumed MATCHES "resumed from [^\n]* at step 7 of 12")
    message(FATAL_ERROR "${_m}: the second run did not resume at step 7")
  endif()
  foreach(_f adapter_model.safetensors adapter_config.json)
    execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files
      ${WORK}/${_m}-straight/${_f} ${WORK}/${_m}-resumed/${_f} RESULT_VARIABLE _differ)
    if(_differ)
      message(FATAL_ERROR "${_m}: the resumed run's ${_f} differs from the straight run's")
    endif()
  endforeach()
  message(STATUS "${_m}: the resumed run wrote the straight run's folder, byte for byte")
endforeach()

list(GET METHODS 0 _m)
run("resume with another learning rate" FALSE _other finetune --base ${BASE} --method ${_m}
  --target all --steps 12 --batch 4 --lr 1e-3 --calibration-batches 2 --eval-bytes 2048
  --checkpoint ${WORK}/${_m}.ckpt --resume)
if(NOT _other MATCHES "another run's checkpoint: its lr is")
  message(FATAL_ERROR "a resume with another --lr was not refused with the reason")
endif()
