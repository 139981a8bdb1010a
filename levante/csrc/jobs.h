// Several matmuls in one parallel region (gemv_multi, and the fused feed-forward of decode.cpp).
#pragma once

#include "xprep.h"

#ifdef HAVE_BF16DOT
namespace levante {

struct Job {  // y [m, n] (row stride ldy) = x [m, k] @ W.T, W = n rows of raw blocks
  int64_t qt;
  const uint8_t* raw;
  int64_t rb, n;
  const XBuf* x;
  float* y;
  int64_t ldy;
};

// every job's units in one parallel region (gemv.cpp)
void run_jobs(const std::vector<Job>& jobs);

}  // namespace levante
#endif  // HAVE_BF16DOT
