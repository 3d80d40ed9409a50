// The interface between the torch-facing binding (scan_ops.cpp) and the per-ISA kernels (scan_isa.cpp):
// plain pointers, sizes and strides (no torch types), so the kernel files include no torch header.
//
// Work is split in tasks, one per (batch row b, block of up to W channels): task = b * n_blocks + block,
// with W the vector width of the ISA. Blocks never straddle a group of a grouped B or C: the channels
// are cut into segments of `seg` channels (dim, or the gcd of B's and C's channels per group), each
// into `seg_blocks` blocks of W (the last one partial). A task owns its outputs; the reductions over
// the batch (dA, dD, d(delta_bias)) and over channel blocks (dB, dC) go to per-task partial buffers
// that the binding sums in a fixed order, so results do not depend on the number of threads.
#pragma once

#include <stdint.h>

namespace m2rec_scan {

enum ForwardMode : int {
  kForwardOut = 0,          // out at every step (inference)
  kForwardOutCkpt = 1,      // out at every step + the state at each chunk start (training)
  kForwardFinal = 2,        // no per-step out: the output at each sequence's last step only
};

// A (batch, rows, L) fp32 tensor: element [b][r][t] at data[b * sb + r * sr + t * st]. For u, delta,
// z, dout and the outputs either st == 1 (rows along L, mamba's layout) or sr == 1 (time-major, as a
// (batch, L, dim) tensor's transpose): the binding copies anything else. B and C take any strides,
// and sg is their group stride ((batch, G, N, L); 0 per sequence, (batch, N, L)).
struct SeqIn {
  const float* data = nullptr;
  int64_t sb = 0, sr = 0, st = 0, sg = 0;
};
struct SeqOut {
  float* data = nullptr;
  int64_t sb = 0, sr = 0, st = 0;
};

struct ScanParams {
  int64_t batch, dim, L, N;
  int64_t n_blocks;         // (dim / seg) * seg_blocks
  int64_t seg, seg_blocks;  // channels per segment, blocks per segment: ceil(seg / W)
  int64_t B_group, C_group;   // channels per group of B / C (dim per sequence)
  int64_t B_groups, C_groups; // G of B / C (1 per sequence)
  int64_t n_chunks;         // ceil(L / kChunk)
  // inputs, fp32
  SeqIn u, delta;
  SeqIn z;                                         // data nullptr: no gate
  SeqIn B, C;                                      // (batch, N, L) or (batch, G, N, L)
  const float* A;                                  // (dim, N) contiguous
  const float* D;                                  // (dim,) or nullptr
  const float* delta_bias;                         // (dim,) or nullptr
  const int64_t* lengths;                          // (batch,) or nullptr (every row has L steps)
  // Low-rank delta (forward only): with delta_weight, `delta` holds dt_low (batch, R, L) and the raw
  // delta is formed per step in registers, delta[b, d, t] = sum_r delta_weight[d, r] * dt_low[b, r, t]
  // (Mamba's dt_proj without its bias), so the (batch, dim, L) delta tensor never exists.
  const float* delta_weight;                       // (dim, R) contiguous, or nullptr: delta given
  int64_t delta_rank;                              // R
  bool softplus;
  // forward outputs
  SeqOut out;                                      // (batch, dim, L), modes kForwardOut*
  float* out_last;                                 // (batch, dim) contiguous, kForwardFinal
  float* last_state;                               // (batch, dim, N) or nullptr
  float* ckpt;                                     // (batch, n_chunks, N, dim), kForwardOutCkpt
  // backward inputs
  SeqIn dout;                                      // data nullptr: no gradient reaches out
  const float* dlast;                              // (batch, dim, N) contiguous or nullptr
  // backward outputs
  SeqOut du;                                       // (batch, dim, L)
  SeqOut ddelta;                                   // (batch, dim, L), w.r.t. the raw delta
  SeqOut dz;                                       // (batch, dim, L), data nullptr without z
  float* dA_part;                                  // (batch, dim, N): per-row partials of dA
  float* dD_part;                                  // (batch, dim) or nullptr
  float* dbias_part;                               // (batch, dim) or nullptr
  // per-block partials (K, batch, G, N, L), K = B_group / seg * seg_blocks: a group's blocks
  float* dB_part;
  float* dC_part;
};

struct KernelTable {
  const char* name;   // "avx512", "avx2", "generic"
  int width;          // W: channels per task
  int chunk;          // time steps per checkpoint
  // run tasks [begin, end) (see above); mode: ForwardMode
  void (*forward)(const ScanParams& p, int mode, int64_t begin, int64_t end);
  void (*backward)(const ScanParams& p, int64_t begin, int64_t end);
  // the vectorised exp on n floats (accuracy tests): the scan's decay path, or the general exp
  void (*exp)(const float* x, float* y, int64_t n, bool scan_path);
};

// Defined by scan_isa.cpp, once per ISA compiled into the library.
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

}  // namespace m2rec_scan
