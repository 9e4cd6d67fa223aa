"""A fused CPU kernel for the eager fast path: per-channel clamp → 1×1 convolution (→ ReLU) in one pass.

An eval-mode DenseNet applies BN→ReLU to every dense layer's whole concatenated input before its
1×1 bottleneck; :func:`ldnbench.inference.fold_preactivation` turns that into a per-channel clamp.
oneDNN has no convolution that applies an elementwise op to its *input*, so the clamp is a separate
pass that reads the block buffer's channel prefix and writes a dense copy, which the convolution
reads again: ~10 % of an LDN121 forward at 1024×2048. This kernel applies the clamp while packing
each block of input rows into a cache-resident buffer, then multiplies it by the packed weights
(a 6×64 register tile), so the prefix is read once and nothing is written but the output.

The C source below is compiled on first use with the system's C compiler (``-O3 -march=native
-fopenmp``) into a private temporary folder; it links the OpenMP runtime torch has already loaded, so
it runs on torch's own thread pool. No compiler, or a failed build: :func:`compile_kernel` returns
``None`` and the reason, and callers keep the unfused ops.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

#: Output channels per packed weight panel: a kernel handles convolutions whose output count divides by it.
PANEL = 64

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  /* unaligned loads and stores */

#define MR 6    /* rows (pixels) per register tile */
#define NR 64   /* output channels per tile and per weight panel */
#define MB 48   /* rows per packed block, a multiple of MR */

int ldn_has_avx512(void) {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

static inline v16 ld(const float *p) { return *(const v16u *)p; }
static inline float clampf(float v, float lo, float hi) { v = v < lo ? lo : v; return v > hi ? hi : v; }

/* the input's geometry: h x w pixels per image; pool = 1: output pixel m reads input pixel m; pool = 2:
   a 2x2 average pool (floor mode) comes between the clamp and the convolution, ho x wo output pixels */
typedef struct { int64_t h, w, ho, wo; int pool; } geom_t;
static inline void st(float *p, v16 v) { *(v16u *)p = v; }

/* C[r, 0:64] = bias + sum_k A[r, k] * B[k, 0:64] for r < rows (A has MR readable rows); prefetches
   npf cache lines from pf, the next block's input, while it computes. */
static void tile(const float *A, int lda, const float *B, int K, float *C, int ldc, const float *bias, int rows,
                 const char *pf, int npf) {
  v16 c[MR][4];
  v16 b0 = ld(bias), b1 = ld(bias + 16), b2 = ld(bias + 32), b3 = ld(bias + 48);
  for (int r = 0; r < MR; r++) { c[r][0] = b0; c[r][1] = b1; c[r][2] = b2; c[r][3] = b3; }
  const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda, *a4 = A + 4 * lda, *a5 = A + 5 * lda;
  int pfi = 0;
  for (int k = 0; k < K; k++) {
    if (pfi < npf && (k & 3) == 0) { __builtin_prefetch(pf + 64 * (int64_t)pfi, 0, 3); pfi++; }
    const float *bk = B + (int64_t)k * NR;
    v16 w0 = ld(bk), w1 = ld(bk + 16), w2 = ld(bk + 32), w3 = ld(bk + 48);
    float s;
    s = a0[k]; c[0][0] += s * w0; c[0][1] += s * w1; c[0][2] += s * w2; c[0][3] += s * w3;
    s = a1[k]; c[1][0] += s * w0; c[1][1] += s * w1; c[1][2] += s * w2; c[1][3] += s * w3;
    s = a2[k]; c[2][0] += s * w0; c[2][1] += s * w1; c[2][2] += s * w2; c[2][3] += s * w3;
    s = a3[k]; c[3][0] += s * w0; c[3][1] += s * w1; c[3][2] += s * w2; c[3][3] += s * w3;
    s = a4[k]; c[4][0] += s * w0; c[4][1] += s * w1; c[4][2] += s * w2; c[4][3] += s * w3;
    s = a5[k]; c[5][0] += s * w0; c[5][1] += s * w1; c[5][2] += s * w2; c[5][3] += s * w3;
  }
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < 4; j++) st(C + (int64_t)r * ldc + 16 * j, c[r][j]);
}

/* rows [m0, m1) of the output, in blocks of MB; returns 0, or -1 when out of memory */
static int rows_range(const float *x, int64_t rs, const geom_t *g, int64_t m0, int64_t m1, int K, int N,
                      const float *lo, const float *hi, const float *bp, const float *bias, float *out, int relu) {
  float *Ap = aligned_alloc(64, (size_t)MB * K * sizeof(float) + 64);
  if (!Ap) return -1;
  int tiles_per_panel = (MB + MR - 1) / MR;
  for (int64_t mc = m0; mc < m1; mc += MB) {
    int mb = (int)(m1 - mc < MB ? m1 - mc : MB);
    for (int r = 0; r < mb; r++) {
      float *dst = Ap + (int64_t)r * K;
      if (!g->pool) {
        const float *src = x + (mc + r) * rs;
        for (int k = 0; k < K; k++) dst[k] = clampf(src[k], lo[k], hi[k]);
        continue;
      }
      /* a 2x2 average pool of the clamped input: output pixel (n, i, j) reads input rows 2i, 2i+1, columns 2j, 2j+1 */
      int64_t m = mc + r, per_image = g->ho * g->wo, n = m / per_image, i = (m % per_image) / g->wo, j = m % g->wo;
      const float *p0 = x + ((n * g->h + 2 * i) * g->w + 2 * j) * rs, *p1 = p0 + rs, *p2 = p0 + g->w * rs, *p3 = p2 + rs;
      for (int k = 0; k < K; k++)
        dst[k] = (((clampf(p0[k], lo[k], hi[k]) + clampf(p1[k], lo[k], hi[k])) + clampf(p2[k], lo[k], hi[k]))
                  + clampf(p3[k], lo[k], hi[k])) * 0.25f;
    }
    int padded = ((mb + MR - 1) / MR) * MR;
    if (padded > mb) memset(Ap + (int64_t)mb * K, 0, (size_t)(padded - mb) * K * sizeof(float));
    int64_t nxt = mc + MB, first = 0, lines = 0, per = 0;
    if (nxt < m1 && !g->pool) {  /* pooled rows are not contiguous: left to the hardware prefetcher */
      int64_t end = nxt + MB < m1 ? nxt + MB : m1;
      first = nxt * rs * 4;
      lines = ((end - 1) * rs * 4 + (int64_t)K * 4 - first + 63) / 64;
      per = (lines + (N / NR) * tiles_per_panel - 1) / ((N / NR) * tiles_per_panel);
    }
    for (int np = 0; np < N / NR; np++) {
      const float *B = bp + (int64_t)np * K * NR;
      for (int r = 0; r < mb; r += MR) {
        int64_t l0 = (np * tiles_per_panel + r / MR) * per;
        const char *pf = (const char *)x + first + 64 * l0;
        int npf = l0 < lines ? (int)(per < lines - l0 ? per : lines - l0) : 0;
        tile(Ap + (int64_t)r * K, K, B, K, out + (mc + r) * N + np * NR, N, bias + np * NR,
             mb - r < MR ? mb - r : MR, pf, npf);
      }
    }
    if (relu) {
      float *o = out + mc * N;
      for (int64_t i = 0; i < (int64_t)mb * N; i++) o[i] = o[i] > 0.f ? o[i] : 0.f;
    }
  }
  free(Ap);
  return 0;
}

/* out[m, n] = relu?(bias[n] + sum_k clamp(x[m * rs + k], lo[k], hi[k]) * W[n, k]) for the n_img x h x w input
   pixels m (pool = 2: for the 2x2-average-pooled clamped input); bp holds W as N / NR panels of K x NR.
   Returns 0, or -1 for bad arguments or no memory. */
int ldn_clamp_conv1x1(const float *x, int64_t n_img, int64_t h, int64_t w, int64_t rs, int pool, int K, int N,
                      const float *lo, const float *hi, const float *bp, const float *bias, float *out, int relu,
                      int threads) {
  geom_t g = {h, w, pool == 2 ? h / 2 : h, pool == 2 ? w / 2 : w, pool == 2};
  int64_t M = n_img * g.ho * g.wo;
  if (N % NR || K < 1 || M < 1 || threads < 1 || (pool != 1 && pool != 2)) return -1;
  int64_t blocks = (M + MB - 1) / MB;
  if (threads > blocks) threads = (int)blocks;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    int64_t m1 = b1 * MB < M ? b1 * MB : M;
    if (b0 * MB < m1) failed |= rows_range(x, rs, &g, b0 * MB, m1, K, N, lo, hi, bp, bias, out, relu) != 0;
  }
  return failed ? -1 : 0;
}
"""

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@dataclass
class ClampConvKernel:
    """The compiled kernel. ``avx512``: built with AVX-512, the only build measured faster than oneDNN."""

    lib: ctypes.CDLL
    avx512: bool
    compiler: str

    def __post_init__(self):
        f = self.lib.ldn_clamp_conv1x1
        f.argtypes = [_PTR, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT]
        f.restype = _INT

    def __deepcopy__(self, memo):  # a loaded library is shared, never copied
        return self

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """A 1×1 convolution's ``out×in×1×1`` weights as the kernel's ``out/64 × in × 64`` panels."""
        n, k = weight.shape[:2]
        if n % PANEL:
            raise ValueError(f"the kernel needs a multiple of {PANEL} output channels, got {n}")
        return weight.detach().reshape(n, k).t().reshape(k, n // PANEL, PANEL).permute(1, 0, 2).contiguous().float()

    @staticmethod
    def accepts(x: torch.Tensor) -> bool:
        """Whether ``x`` (N×C×H×W) is a float32 CPU tensor whose pixels are rows of a common stride with
        contiguous channels: channels-last, or a channel prefix of a channels-last tensor."""
        if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0:
            return False
        n, _, h, w = x.shape
        rs = x.stride(3)
        return (x.stride(1) == 1 and rs >= x.shape[1] and (h == 1 or x.stride(2) == w * rs)
                and (n == 1 or x.stride(0) == h * w * rs))

    def __call__(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: torch.Tensor,
                 bias: torch.Tensor, relu: bool = False, pool: int = 1) -> torch.Tensor:
        """``relu?(conv1x1(clamp(x, lo, hi)))`` as a channels-last tensor, with ``pool=2`` a 2×2 average
        pool (floor mode) of the clamped input before the conv; ``x`` must pass :meth:`accepts`."""
        n, k, h, w = x.shape
        out_channels = packed.shape[0] * PANEL
        if (not self.accepts(x) or packed.shape[1] != k or lo.numel() != k or hi.numel() != k or pool not in (1, 2)
                or h < pool or w < pool):
            raise ValueError(f"clamp-conv kernel: unsupported input {tuple(x.shape)} / strides {x.stride()}")
        if bias.numel() != out_channels or not all(t.dtype == torch.float32 and t.device.type == "cpu"
                                                   and t.is_contiguous() for t in (lo, hi, packed, bias)):
            raise ValueError("clamp-conv kernel: bounds, packed weights and bias must be contiguous float32 CPU tensors")
        out = torch.empty(n, out_channels, h // pool, w // pool, memory_format=torch.channels_last)
        ret = self.lib.ldn_clamp_conv1x1(x.data_ptr(), n, h, w, x.stride(3), pool, k, out_channels, lo.data_ptr(),
                                         hi.data_ptr(), packed.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                         int(relu), torch.get_num_threads())
        if ret != 0:
            raise RuntimeError("clamp-conv kernel failed (out of memory)")
        return out


def _compiler() -> str | None:
    return next((p for p in (shutil.which(c) for c in ("cc", "gcc", "clang")) if p), None)


def compile_kernel(compiler: str | None = None) -> tuple[ClampConvKernel | None, str]:
    """(kernel, how it was built) or (None, why not). Builds into a temporary folder that is removed
    again (the loaded library stays mapped); a build takes well under a second."""
    cc = compiler or _compiler()
    if cc is None:
        return None, "no C compiler (cc/gcc/clang) on PATH"
    with tempfile.TemporaryDirectory(prefix="ldnbench-kernel-") as tmp:
        src = Path(tmp) / "clamp_conv.c"
        lib = Path(tmp) / "clamp_conv.so"
        src.write_text(_SOURCE)
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(lib), str(src)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{Path(cc).name} could not build the kernel: {e}"
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"{Path(cc).name} could not build the kernel: {last}"
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError as e:
            return None, f"the built kernel does not load: {e}"
    kernel = ClampConvKernel(handle, bool(handle.ldn_has_avx512()), Path(cc).name)
    return kernel, f"built with {kernel.compiler} ({'AVX-512' if kernel.avx512 else 'no AVX-512'})"
