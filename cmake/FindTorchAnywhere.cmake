# Finds LibTorch from Debian's libtorch-dev (no hints needed) or from a pip PyTorch
# (-DTorch_DIR=..., or the torch package of the python3 on PATH).
if(NOT TARGET torch)
  # Imported targets are seen only in the directory that found them and below. lightron's
  # interface names torch, whose properties name torch_cpu, c10, ...: a project that adds
  # lightron with add_subdirectory needs them global (CMake >= 3.24; older: install lightron
  # and use find_package). The caller's setting is restored afterwards.
  set(_lightron_targets_global "${CMAKE_FIND_PACKAGE_TARGETS_GLOBAL}")
  set(CMAKE_FIND_PACKAGE_TARGETS_GLOBAL ON)
  find_package(Torch QUIET)
  if(NOT Torch_FOUND)
    find_program(LIGHTRON_PYTHON NAMES python3 python)
    if(LIGHTRON_PYTHON)
      execute_process(COMMAND ${LIGHTRON_PYTHON} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
                      OUTPUT_VARIABLE _lightron_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
      if(_lightron_torch_prefix)
        list(APPEND CMAKE_PREFIX_PATH "${_lightron_torch_prefix}")
      endif()
    endif()
    find_package(Torch REQUIRED)
  endif()
  set(CMAKE_FIND_PACKAGE_TARGETS_GLOBAL "${_lightron_targets_global}")
endif()
