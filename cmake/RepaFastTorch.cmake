# RepaFastTorch.cmake: finds libtorch (a pip-installed torch or an unpacked libtorch archive) and
# decides whether the CUDA part of repa_fast_native is built.
#
# Input (cache):  REPA_FAST_WITH_CUDA = AUTO | ON | OFF, CMAKE_CUDA_ARCHITECTURES, Torch_DIR,
#                 CMAKE_PREFIX_PATH, Python3_EXECUTABLE (used only when torch is not found otherwise).
# Output:         target repa_fast::torch (INTERFACE, links libtorch, include dirs, ABI define),
#                 REPA_FAST_CUDA (TRUE/FALSE), REPA_FAST_TORCH_HAS_CUDA, REPA_FAST_TORCH_PREFIX,
#                 REPA_FAST_TORCH_IMPORT ("TorchConfig" or "cpu-only"), REPA_FAST_TORCH_VERSION,
#                 REPA_FAST_CXX_STANDARD, REPA_FAST_CUDA_ARCHITECTURES (when REPA_FAST_CUDA).
#
# Why not just find_package(Torch)? The TorchConfig.cmake of a CUDA build of torch (every
# Linux x86-64 pip wheel by default) requires a CUDA toolkit (nvcc, cudart, the CUDA headers):
# without one it stops with "Your installed Caffe2 version uses CUDA but I cannot find the CUDA
# libraries". A CPU-only build of repa_fast_native needs none of that, so when the CUDA part is
# not built against a CUDA torch, libtorch is imported here directly (torch_cpu + c10, the
# libraries that hold every CPU kernel, the autograd engine and the dispatcher). In every other
# case torch's own TorchConfig.cmake is used.

include_guard(GLOBAL)
include(CheckLanguage)

# ---- 1. Where is torch? ----------------------------------------------------------------------
# find_package(Torch) searches Torch_DIR, CMAKE_PREFIX_PATH, ...; locate the same config file
# first, to inspect the installation before torch's config runs (which may stop the configure).
set(_repa_prefixes ${CMAKE_PREFIX_PATH})
if(DEFINED ENV{CMAKE_PREFIX_PATH})
  file(TO_CMAKE_PATH "$ENV{CMAKE_PREFIX_PATH}" _repa_env_prefixes)
  list(APPEND _repa_prefixes ${_repa_env_prefixes})
endif()
find_path(Torch_DIR TorchConfig.cmake
  HINTS ${_repa_prefixes}
  PATH_SUFFIXES Torch share/cmake/Torch lib/cmake/Torch
  DOC "Directory holding TorchConfig.cmake (<torch>/share/cmake/Torch)")
if(NOT Torch_DIR)
  # Not given: ask the Python interpreter that has torch installed (an active virtualenv first).
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _repa_torch_prefix_path OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _repa_py_rc ERROR_QUIET)
    if(_repa_py_rc EQUAL 0 AND EXISTS "${_repa_torch_prefix_path}/Torch/TorchConfig.cmake")
      set(Torch_DIR "${_repa_torch_prefix_path}/Torch" CACHE PATH
        "Directory holding TorchConfig.cmake (<torch>/share/cmake/Torch)" FORCE)
      message(STATUS "repa_fast: torch found through ${Python3_EXECUTABLE}")
    endif()
  endif()
endif()
if(NOT Torch_DIR OR NOT EXISTS "${Torch_DIR}/TorchConfig.cmake")
  message(FATAL_ERROR
    "repa_fast: libtorch not found. Pass its CMake directory, e.g.\n"
    "  -DCMAKE_PREFIX_PATH=\"$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')\"\n"
    "or -DCMAKE_PREFIX_PATH=/path/to/libtorch (an unpacked libtorch archive).")
endif()
get_filename_component(REPA_FAST_TORCH_PREFIX "${Torch_DIR}/../../.." ABSOLUTE)

# A CUDA build of torch ships libtorch_cuda next to libtorch_cpu.
file(GLOB _repa_torch_cuda_libs "${REPA_FAST_TORCH_PREFIX}/lib/*torch_cuda.*")
if(_repa_torch_cuda_libs)
  set(REPA_FAST_TORCH_HAS_CUDA TRUE)
else()
  set(REPA_FAST_TORCH_HAS_CUDA FALSE)
endif()

set(REPA_FAST_TORCH_VERSION "unknown version")
if(EXISTS "${Torch_DIR}/TorchConfigVersion.cmake")
  file(STRINGS "${Torch_DIR}/TorchConfigVersion.cmake" _repa_ver REGEX "set\\(PACKAGE_VERSION \"")
  if(_repa_ver MATCHES "PACKAGE_VERSION \"([^\"]+)\"")
    set(REPA_FAST_TORCH_VERSION "${CMAKE_MATCH_1}")
  endif()
endif()

# ---- 2. C++ standard: at least C++17, or what torch's config declares (C++20 since torch
# 2.10: its headers do not compile as C++17 any more). ----------------------------------------
set(REPA_FAST_CXX_STANDARD 17)
file(STRINGS "${Torch_DIR}/TorchConfig.cmake" _repa_std REGEX "CXX_STANDARD[ ]+[0-9]+")
if(_repa_std)
  string(REGEX REPLACE ".*CXX_STANDARD[ ]+([0-9]+).*" "\\1" _repa_std "${_repa_std}")
  if(_repa_std GREATER REPA_FAST_CXX_STANDARD)
    set(REPA_FAST_CXX_STANDARD ${_repa_std})
  endif()
endif()

# ---- 3. Build the CUDA part? -----------------------------------------------------------------
string(TOUPPER "${REPA_FAST_WITH_CUDA}" _repa_with_cuda)
if(NOT _repa_with_cuda MATCHES "^(AUTO|ON|OFF|TRUE|FALSE|YES|NO|1|0)$")
  message(FATAL_ERROR "repa_fast: REPA_FAST_WITH_CUDA must be AUTO, ON or OFF (got '${REPA_FAST_WITH_CUDA}')")
endif()
if(_repa_with_cuda MATCHES "^(TRUE|YES|1)$")
  set(_repa_with_cuda ON)
elseif(_repa_with_cuda MATCHES "^(FALSE|NO|0)$")
  set(_repa_with_cuda OFF)
endif()

set(REPA_FAST_CUDA FALSE)
if(NOT _repa_with_cuda STREQUAL "OFF")
  if(NOT REPA_FAST_TORCH_HAS_CUDA)
    set(_repa_why "this torch (${REPA_FAST_TORCH_PREFIX}) is a CPU-only build")
  else()
    check_language(CUDA)  # CUDACXX, -DCMAKE_CUDA_COMPILER=..., or nvcc on PATH
    if(CMAKE_CUDA_COMPILER)
      set(REPA_FAST_CUDA TRUE)
    else()
      set(_repa_why "no CUDA compiler (nvcc) was found: put it on PATH, or set CUDACXX or "
        "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
    endif()
  endif()
  if(NOT REPA_FAST_CUDA)
    string(CONCAT _repa_why ${_repa_why})
    if(_repa_with_cuda STREQUAL "ON")
      message(FATAL_ERROR "repa_fast: REPA_FAST_WITH_CUDA=ON, but ${_repa_why}. "
        "Use -DREPA_FAST_WITH_CUDA=OFF (or AUTO) for a CPU-only library.")
    endif()
    message(STATUS "repa_fast: CUDA part not built: ${_repa_why}")
  endif()
endif()

# ---- 4. Import libtorch. ---------------------------------------------------------------------
add_library(repa_fast_torch INTERFACE)
add_library(repa_fast::torch ALIAS repa_fast_torch)

if(REPA_FAST_CUDA)
  enable_language(CUDA)
  # The CUDA architectures: CMAKE_CUDA_ARCHITECTURES (default 80;90, set by the caller before
  # enable_language). torch's config ignores it (it warns, sets it OFF and adds -gencode flags
  # for TORCH_CUDA_ARCH_LIST, autodetected: a dozen architectures) -- so hide it from torch's
  # config, give torch a one-architecture list, drop torch's -gencode flags afterwards and put
  # CMAKE_CUDA_ARCHITECTURES back.
  set(REPA_FAST_CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
  get_property(_repa_arch_doc CACHE CMAKE_CUDA_ARCHITECTURES PROPERTY HELPSTRING)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  unset(CMAKE_CUDA_ARCHITECTURES)
  set(_repa_saved_arch_list "${TORCH_CUDA_ARCH_LIST}")
  set(TORCH_CUDA_ARCH_LIST "8.0")
  set(_repa_cuda_flags_before "${CMAKE_CUDA_FLAGS}")
  # torch's FindCUDA derives the toolkit from nvcc's path, which fails for an nvcc that is a
  # wrapper script or symlink (e.g. /usr/local/bin/nvcc); hand it the root CMake found.
  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit root")
  endif()

  find_package(Torch REQUIRED CONFIG)

  set(TORCH_CUDA_ARCH_LIST "${_repa_saved_arch_list}")
  unset(CMAKE_CUDA_ARCHITECTURES)  # torch may have set it OFF
  set(CMAKE_CUDA_ARCHITECTURES "${REPA_FAST_CUDA_ARCHITECTURES}" CACHE STRING "${_repa_arch_doc}" FORCE)
  string(REGEX REPLACE "-gencode[ ;=]+arch=compute_[0-9a-z]+,code=[^ ;]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  string(REGEX REPLACE "  +" " " CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")

  # ATen/cuda/CUDAContext.h includes cuBLAS, cuSPARSE and cuSOLVER headers. A minimal toolkit
  # (nvcc + cudart) lacks them; the pip wheels torch depends on (nvidia-cublas, ...) ship them
  # in site-packages/nvidia/*/include. Add those with -idirafter: searched after the toolkit's
  # own headers, so they only fill the gaps.
  set(_repa_has_cusparse FALSE)
  foreach(_dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
    if(EXISTS "${_dir}/cusparse.h")
      set(_repa_has_cusparse TRUE)
    endif()
  endforeach()
  if(NOT _repa_has_cusparse)
    file(GLOB _repa_pip_cuda_includes "${REPA_FAST_TORCH_PREFIX}/../nvidia/*/include")
    set(REPA_FAST_CUDA_EXTRA_INCLUDES "")
    foreach(_dir IN LISTS _repa_pip_cuda_includes)
      file(GLOB _repa_math_headers "${_dir}/cusparse.h" "${_dir}/cublas_v2.h" "${_dir}/cublasLt.h"
        "${_dir}/cusolverDn.h")
      if(_repa_math_headers)
        get_filename_component(_dir "${_dir}" ABSOLUTE)
        list(APPEND REPA_FAST_CUDA_EXTRA_INCLUDES "${_dir}")
        target_compile_options(repa_fast_torch INTERFACE
          "$<$<COMPILE_LANGUAGE:CXX>:-idirafter${_dir}>"
          "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-idirafter${_dir}>")
      endif()
    endforeach()
    if(REPA_FAST_CUDA_EXTRA_INCLUDES)
      message(STATUS "repa_fast: the CUDA toolkit has no cusparse.h; using the headers of the "
        "pip CUDA packages: ${REPA_FAST_CUDA_EXTRA_INCLUDES}")
    else()
      message(WARNING "repa_fast: the CUDA toolkit (${CUDAToolkit_INCLUDE_DIRS}) has no "
        "cusparse.h / cublas_v2.h, which ATen/cuda/CUDAContext.h includes; install the full "
        "toolkit if a .cu file includes it")
    endif()
  endif()
  set(REPA_FAST_TORCH_IMPORT "TorchConfig")
elseif(NOT REPA_FAST_TORCH_HAS_CUDA)
  find_package(Torch REQUIRED CONFIG)  # a CPU-only torch: its config needs nothing else
  set(REPA_FAST_TORCH_IMPORT "TorchConfig")
else()
  # A CUDA torch without the CUDA part: import the CPU libraries only (see the top of this file).
  find_library(REPA_FAST_TORCH_CPU_LIBRARY torch_cpu PATHS "${REPA_FAST_TORCH_PREFIX}/lib" NO_DEFAULT_PATH)
  find_library(REPA_FAST_C10_LIBRARY c10 PATHS "${REPA_FAST_TORCH_PREFIX}/lib" NO_DEFAULT_PATH)
  if(NOT REPA_FAST_TORCH_CPU_LIBRARY OR NOT REPA_FAST_C10_LIBRARY)
    message(FATAL_ERROR "repa_fast: libtorch_cpu / libc10 not found in ${REPA_FAST_TORCH_PREFIX}/lib")
  endif()
  set(TORCH_INCLUDE_DIRS
    "${REPA_FAST_TORCH_PREFIX}/include"
    "${REPA_FAST_TORCH_PREFIX}/include/torch/csrc/api/include")
  set(TORCH_LIBRARIES "${REPA_FAST_TORCH_CPU_LIBRARY}" "${REPA_FAST_C10_LIBRARY}")
  set(TORCH_CXX_FLAGS "")
  set(REPA_FAST_TORCH_IMPORT "cpu-only")
  target_include_directories(repa_fast_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
  find_package(Threads REQUIRED)
  target_link_libraries(repa_fast_torch INTERFACE Threads::Threads)
endif()

# Entries torch's config could not resolve (e.g. CUDA_nvrtc_LIBRARY-NOTFOUND where the toolkit
# has no libnvrtc.so: pip wheels bring their own) would fail the generate step; libtorch_cuda
# itself already depends on them, so they are dropped.
set(_repa_torch_libs "")
foreach(_lib IN LISTS TORCH_LIBRARIES)
  if(_lib MATCHES "NOTFOUND$")
    message(STATUS "repa_fast: not linking ${_lib} (libtorch loads it itself)")
  else()
    list(APPEND _repa_torch_libs "${_lib}")
  endif()
endforeach()
set(TORCH_LIBRARIES "${_repa_torch_libs}")
target_link_libraries(repa_fast_torch INTERFACE ${TORCH_LIBRARIES})

# ---- 5. The libstdc++ ABI libtorch was built with (torch._C._GLIBCXX_USE_CXX11_ABI). ----------
# TorchConfig.cmake passes it in TORCH_CXX_FLAGS up to torch 2.6; later configs pass nothing
# (every wheel uses the cxx11 ABI). Read it off libc10: cxx11-ABI symbols name std::__cxx11.
set(REPA_FAST_TORCH_CXX11_ABI "")
if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=([01])")
  set(REPA_FAST_TORCH_CXX11_ABI ${CMAKE_MATCH_1})
elseif(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" OR CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  file(GLOB _repa_c10 "${REPA_FAST_TORCH_PREFIX}/lib/libc10.so" "${REPA_FAST_TORCH_PREFIX}/lib/libc10.dylib")
  if(_repa_c10)
    list(GET _repa_c10 0 _repa_c10)
    file(STRINGS "${_repa_c10}" _repa_cxx11 REGEX "St7__cxx11" LIMIT_COUNT 1)
    if(_repa_cxx11)
      set(REPA_FAST_TORCH_CXX11_ABI 1)
    else()
      set(REPA_FAST_TORCH_CXX11_ABI 0)
    endif()
  endif()
endif()
if(NOT REPA_FAST_TORCH_CXX11_ABI STREQUAL "" AND NOT APPLE)
  target_compile_definitions(repa_fast_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${REPA_FAST_TORCH_CXX11_ABI})
endif()
