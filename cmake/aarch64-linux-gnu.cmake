# Cross build of the kernel core for 64-bit ARM (aarch64 Linux, glibc) with Debian's/Ubuntu's cross toolchain
# (g++-aarch64-linux-gnu); tests and benchmarks then run under user-mode qemu through CMake's emulator hook, so
# ctest works unchanged.   cmake --workflow --preset aarch64-qemu
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(XNORCONV_CROSS_PREFIX aarch64-linux-gnu- CACHE STRING "cross toolchain prefix")
set(XNORCONV_CROSS_SYSROOT /usr/aarch64-linux-gnu CACHE PATH "target libraries (the -L of qemu-aarch64)")
set(CMAKE_C_COMPILER ${XNORCONV_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${XNORCONV_CROSS_PREFIX}g++)

set(CMAKE_FIND_ROOT_PATH ${XNORCONV_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# No -march/-mcpu: the baseline armv8-a (with Advanced SIMD) is what a distributable build targets.
find_program(XNORCONV_QEMU_AARCH64 qemu-aarch64)
if(XNORCONV_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${XNORCONV_QEMU_AARCH64} -L ${XNORCONV_CROSS_SYSROOT})
endif()
