// One max pool (MaxPoolShape) an output row at a time, from input rows held anywhere: max_pools.cpp runs it over a
// whole input, first_layer.cpp over the rows of a stem's output it keeps while it computes the next ones (a fused
// stem and pool). Not part of the core's interface (xnorconv_core.h): an implementation piece the two share.
#pragma once

#include <cstdint>
#include <vector>

#include "xnorconv_core.h"

namespace xnorconv {

// A thread's scratch for the rows of one pool: a row padded to every window's extent (-inf outside the image, so
// each window has kernel_w taps at a fixed step), and the column-phase split of the NCHW strided case.
class MaxPoolRows {
 public:
  // For rows of `planes` planes at a time (NCHW channels; 1 for NHWC, whose pixels hold every channel). ops and s
  // must outlive it.
  MaxPoolRows(const KernelOps& ops, const MaxPoolShape& s, int64_t planes = 1);
  // Output row oy of each plane p < planes (an NCHW channel, or every channel of an NHWC image) into
  // out + p * out_plane_stride; input row y of plane p is at rows + p * plane_stride + (y - first_row) * row_stride,
  // for every row the windows of row oy read.
  void row(const float* rows, int64_t first_row, int64_t row_stride, int64_t oy, float* out, int64_t plane_stride = 0,
           int64_t out_plane_stride = 0);

 private:
  const KernelOps& ops_;
  const MaxPoolShape& s_;
  int64_t depth_;     // floats per pixel: 1 (NCHW plane) or the channels (NHWC)
  int64_t planes_;
  int64_t pixels_;    // of a padded row
  int64_t interior_;  // the image pixels that lie in the padded row (the rest is never read)
  int64_t phases_ = 1, phase_length_ = 0;
  bool phase_split_ = false;
  // NCHW, 3-wide windows at column stride 2, and the family has stride2_width3_pool_row: a row in one call.
  static constexpr int64_t kMaxFusedRows = 16;
  bool fused_row_ = false;
  std::vector<float> padded_, split_, maxima_;
};

}  // namespace xnorconv
