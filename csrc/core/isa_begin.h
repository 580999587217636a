// Usage: #define XNORCONV_ISA_TARGET "avx2,fma" then #include "isa_begin.h" after every standard header and before
// kernel_common.h; #include "isa_end.h" at the end of the file. Everything in between is compiled for that ISA only
// (GCC: pragma target; Clang: attribute push), so a global -m flag is never needed.
#define XNORCONV_DO_PRAGMA(x) _Pragma(#x)
// One more expansion step so that XNORCONV_ISA_TARGET is replaced by its string before _Pragma sees it.
#define XNORCONV_TARGET_PRAGMA(t) XNORCONV_DO_PRAGMA(GCC target(t))
#define XNORCONV_CLANG_PUSH(t) XNORCONV_DO_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#if defined(__clang__)
XNORCONV_CLANG_PUSH(XNORCONV_ISA_TARGET)
#elif defined(__GNUC__)
XNORCONV_DO_PRAGMA(GCC push_options)
XNORCONV_TARGET_PRAGMA(XNORCONV_ISA_TARGET)
#endif
