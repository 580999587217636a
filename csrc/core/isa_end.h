#if defined(__clang__)
XNORCONV_DO_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
XNORCONV_DO_PRAGMA(GCC pop_options)
#endif
#undef XNORCONV_DO_PRAGMA
#undef XNORCONV_TARGET_PRAGMA
#undef XNORCONV_CLANG_PUSH
#undef XNORCONV_ISA_TARGET
