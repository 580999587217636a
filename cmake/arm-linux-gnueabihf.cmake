# Cross build of the kernel core for 32-bit ARM (armv7-a hard-float, e.g. Raspberry Pi OS 32-bit) with
# g++-arm-linux-gnueabihf; tests run under qemu-arm. There is no NEON family for 32-bit ARM (see docs/arm.md):
# this build checks that the core and its portable scalar family build and pass there.
#   cmake --workflow --preset armv7-qemu
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR armv7l)

set(XNORCONV_CROSS_PREFIX arm-linux-gnueabihf- CACHE STRING "cross toolchain prefix")
set(XNORCONV_CROSS_SYSROOT /usr/arm-linux-gnueabihf CACHE PATH "target libraries (the -L of qemu-arm)")
set(CMAKE_C_COMPILER ${XNORCONV_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${XNORCONV_CROSS_PREFIX}g++)

set(CMAKE_FIND_ROOT_PATH ${XNORCONV_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

find_program(XNORCONV_QEMU_ARM qemu-arm)
if(XNORCONV_QEMU_ARM)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${XNORCONV_QEMU_ARM} -L ${XNORCONV_CROSS_SYSROOT})
endif()
