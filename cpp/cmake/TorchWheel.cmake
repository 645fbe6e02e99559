# torch_wheel::torch -- libtorch as it ships inside a pip torch wheel, as an imported target.
#
# Why not find_package(Torch): the wheel's TorchConfig.cmake is that of a CUDA build and will
# not configure without the CUDA toolkit, although CPU inference needs nothing of CUDA at build
# time. The wheel holds everything else a consumer needs: headers under torch/include and
# shared libraries under torch/lib. A framework with its own libtorch (CMSSW, Athena) links
# that instead and can drop this file.
#
# Inputs (cache variables):
#   TORCH_DIR             the torch package directory; found with TORCH_PYTHON when empty:
#                           python -c "import torch, os; print(os.path.dirname(torch.__file__))"
#   TORCH_WHEEL_CXX11_ABI the wheel's C++ ABI (torch.compiled_with_cxx11_abi(); ON since 2.7)
# Output: the target torch_wheel::torch, the variable TORCH_WHEEL_VERSION, and for a CUDA wheel
# the target torch_wheel::cuda with TORCH_WHEEL_CUDA set to ON (OFF otherwise).

set(TORCH_DIR "" CACHE PATH "torch package directory (site-packages/torch)")
set(TORCH_PYTHON "python3" CACHE STRING "Python used to locate torch when TORCH_DIR is empty")
option(TORCH_WHEEL_CXX11_ABI "torch wheel built with the C++11 ABI" ON)

if(NOT TORCH_DIR)
  execute_process(
    COMMAND "${TORCH_PYTHON}" -c "import torch, os; print(os.path.dirname(torch.__file__))"
    OUTPUT_VARIABLE _torch_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
  if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "TorchWheel: set TORCH_DIR, or TORCH_PYTHON to a Python that has torch")
  endif()
  set(TORCH_DIR "${_torch_dir}" CACHE PATH "torch package directory (site-packages/torch)" FORCE)
endif()
if(NOT EXISTS "${TORCH_DIR}/include/torch/script.h")
  message(FATAL_ERROR "TorchWheel: no include/torch/script.h under ${TORCH_DIR}; not a torch wheel")
endif()

file(STRINGS "${TORCH_DIR}/share/cmake/Torch/TorchConfigVersion.cmake" _v
     REGEX "set\\(PACKAGE_VERSION \"")
string(REGEX REPLACE ".*\"(.*)\".*" "\\1" TORCH_WHEEL_VERSION "${_v}")

# One imported shared library per torch/lib/lib<name>.so; the build tree gets an rpath to
# torch/lib from these locations, so the program runs without LD_LIBRARY_PATH.
function(_torch_wheel_lib name)
  set(lib "${TORCH_DIR}/lib/lib${name}.so")
  if(NOT EXISTS "${lib}")
    message(FATAL_ERROR "TorchWheel: ${lib} not found")
  endif()
  add_library(torch_wheel::lib${name} SHARED IMPORTED)
  set_target_properties(torch_wheel::lib${name} PROPERTIES IMPORTED_LOCATION "${lib}")
endfunction()

if(NOT TARGET torch_wheel::torch)
  # torch_cpu holds ATen, the TorchScript runtime and the AOTInductor package loader; c10 the
  # core types. libtorch itself is referenced by no symbol of ours, but an AOTInductor package's
  # compiled model.so lists it as NEEDED with no rpath, so it must already be loaded when the
  # package is dlopened (the loader then matches it by soname); it also loads libtorch_cuda,
  # whose kernels register themselves, which is what CUDA artifacts need.
  _torch_wheel_lib(c10)
  _torch_wheel_lib(torch_cpu)
  _torch_wheel_lib(torch)
  add_library(torch_wheel::torch INTERFACE IMPORTED)
  target_include_directories(torch_wheel::torch INTERFACE
    "${TORCH_DIR}/include" "${TORCH_DIR}/include/torch/csrc/api/include")
  if(TORCH_WHEEL_CXX11_ABI)
    target_compile_definitions(torch_wheel::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  else()
    target_compile_definitions(torch_wheel::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=0)
  endif()
  # torch 2.14's ATen headers refuse any standard before C++20 (2.10 and 2.11 take C++17).
  target_compile_features(torch_wheel::torch INTERFACE cxx_std_20)
  # --no-as-needed: keep libtorch although nothing references it (see above); Ubuntu's
  # toolchain drops unreferenced libraries by default.
  target_link_options(torch_wheel::torch INTERFACE "LINKER:--no-as-needed")
  target_link_libraries(torch_wheel::torch INTERFACE
    torch_wheel::libtorch torch_wheel::libtorch_cpu torch_wheel::libc10)
  message(STATUS "TorchWheel: torch ${TORCH_WHEEL_VERSION} from ${TORCH_DIR}")
endif()

# A CUDA wheel's own libraries, for consumers that run on a GPU: c10_cuda (streams, guards) and
# torch_cuda (the CUDA kernels and AOTInductor's CUDA runner). The CUDA runtime itself comes
# from the toolkit (CUDA::cudart), as with find_package(Torch).
set(TORCH_WHEEL_CUDA OFF)
if(EXISTS "${TORCH_DIR}/lib/libc10_cuda.so" AND EXISTS "${TORCH_DIR}/lib/libtorch_cuda.so")
  set(TORCH_WHEEL_CUDA ON)
  if(NOT TARGET torch_wheel::cuda)
    _torch_wheel_lib(c10_cuda)
    _torch_wheel_lib(torch_cuda)
    add_library(torch_wheel::cuda INTERFACE IMPORTED)
    target_link_libraries(torch_wheel::cuda INTERFACE
      torch_wheel::torch torch_wheel::libtorch_cuda torch_wheel::libc10_cuda)
  endif()
endif()
