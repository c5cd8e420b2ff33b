// Decode-time linears on CPU: y[m, n] = sum_k x[m, k] * w[n, k] for a handful of rows m.
// Memory bound: every weight byte is read once per call; threads take blocks of ROWS weight rows, and
// each x row is reused from cache across a block. Within a block GROUP rows are read side by side, one
// accumulator each: more loads in flight than one row at a time (on a 2-core Xeon, with huge pages, over
// 1B's linears: fp32 0.87 -> 0.97, bf16 0.82 -> 0.87, int8 0.75 -> 0.81 of a plain read's rate; software
// prefetch, which had helped one row at a time by 4-13%, then changed nothing, so it is gone).
// bf16 has a second path where the CPU has AMX: each tile multiply takes 16 weight rows x 32 columns
// straight from memory (0.89 of the read rate on that Xeon); cpu_gemv.py measures which of the two (or
// aten's linear) is fastest on the machine at hand.
// Built by cpu_gemv.py with -O3 -march=native -fopenmp: the AVX-512 and AMX paths exist only where the
// CPU has them, the plain C loops (omp simd) vectorize anywhere.
// Threads: OpenMP, the same libgomp and thread count as torch in the calling process; rows are handed out
// in chunks of a few blocks as threads free up (as llama.cpp does), so a vCPU the host pauses delays no one.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define ROWS 8
#define GROUP 4

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// acc[r] = dot(x, w row r) for nr <= ROWS rows of length k; rows past the last whole GROUP (only in
// shapes no Llama has) take the plain loop.
static void rows_f32(const float* x, const float* w, float* acc, int64_t nr, int64_t k) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if (k % 16 == 0) {
    for (; r + GROUP <= nr; r += GROUP) {
      const float *w0 = w + r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + j);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j), xv, a3);
      }
      acc[r] = _mm512_reduce_add_ps(a0); acc[r + 1] = _mm512_reduce_add_ps(a1);
      acc[r + 2] = _mm512_reduce_add_ps(a2); acc[r + 3] = _mm512_reduce_add_ps(a3);
    }
  }
#endif
  for (; r < nr; r++) {
    const float* wr = w + r * k;
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < k; j++) s += wr[j] * x[j];
    acc[r] = s;
  }
}

// Same for bf16 weights and activations; products and sums in fp32 (vdpbf16ps: 32 bf16 products per
// instruction, exact in fp32).
static void rows_bf16(const uint16_t* x, const float* xf, const uint16_t* w, float* acc, int64_t nr, int64_t k) {
  int64_t r = 0;
#if defined(__AVX512BF16__)
  if (k % 32 == 0) {
    for (; r + GROUP <= nr; r += GROUP) {
      const uint16_t *w0 = w + r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k; j += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + j), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + j), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + j), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + j), xv);
      }
      acc[r] = _mm512_reduce_add_ps(a0); acc[r + 1] = _mm512_reduce_add_ps(a1);
      acc[r + 2] = _mm512_reduce_add_ps(a2); acc[r + 3] = _mm512_reduce_add_ps(a3);
    }
  }
#endif
  (void)x;
  for (; r < nr; r++) {
    const uint16_t* wr = w + r * k;
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < k; j++) s += bf16_to_f32(wr[j]) * xf[j];
    acc[r] = s;
  }
}

void gemv_f32(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k) {
  #pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
    int64_t nr = n - r0 < ROWS ? n - r0 : ROWS;
    float acc[ROWS];
    for (int64_t i = 0; i < m; i++) {
      rows_f32(x + i * k, w + r0 * k, acc, nr, k);
      for (int64_t r = 0; r < nr; r++) y[i * n + r0 + r] = acc[r];
    }
  }
}

#if HAVE_AMX
// One AMX tile multiply per 16 weight rows x 32 columns: A = 16 rows loaded from w with a row stride (no
// repacking); B = 32 activations of each of the m x rows in AMX's pair layout, 4m bytes a row (at m = 1,
// x itself); C = 16 x m sums in fp32. Threads take chunks of 16 x TILE_STRIDE rows, and a tile's rows lie
// TILE_STRIDE rows apart: each of its 16 streams then reads TILE_STRIDE consecutive rows (on a 2-core
// Xeon rows 4-16 apart read 2-5% faster than adjacent ones). Each thread loads its own tile configuration and
// restores the one it found (torch's oneDNN may keep its own in the same threads).
#define TILE_STRIDE 8
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

static void gemv_bf16_amx(const uint16_t* x, const float* xf, const uint16_t* w, uint16_t* y, int64_t m, int64_t n,
                          int64_t k) {
  const uint16_t* xp = x;  // pairs: xp[(p * m + i) * 2 + h] = x[i, 2p + h]
  uint16_t* buf = NULL;
  if (m > 1) {
    buf = malloc(sizeof(uint16_t) * m * k);
    if (!buf) abort();
    for (int64_t p = 0; p < k / 2; p++)
      for (int64_t i = 0; i < m; i++) { buf[(p * m + i) * 2] = x[i * k + 2 * p]; buf[(p * m + i) * 2 + 1] = x[i * k + 2 * p + 1]; }
    xp = buf;
  }
  #pragma omp parallel
  {
    tile_config saved, cfg;
    _tile_storeconfig(&saved);
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16; cfg.colsb[0] = (uint16_t)(4 * m);  // C
    cfg.rows[1] = 16; cfg.colsb[1] = (uint16_t)(4 * m);  // B: 16 pairs of columns x m rows of x
    cfg.rows[2] = 16; cfg.colsb[2] = 64;                 // A: 16 weight rows x 32 bf16
    _tile_loadconfig(&cfg);
    float c[16 * 16], acc[16];
    #pragma omp for schedule(dynamic, 1)
    for (int64_t c0 = 0; c0 < n; c0 += 16 * TILE_STRIDE) {
      int64_t st = (n - c0) / 16 < TILE_STRIDE ? (n - c0) / 16 : TILE_STRIDE;  // the last chunk may be shorter
      for (int64_t r = 0; r < st; r++) {
        _tile_zero(0);
        for (int64_t j = 0; j < k; j += 32) {
          _tile_loadd(1, xp + j * m, 4 * m);
          _tile_loadd(2, w + (c0 + r) * k + j, 2 * k * st);
          _tile_dpbf16ps(0, 2, 1);
        }
        _tile_stored(0, c, 4 * m);
        for (int64_t q = 0; q < 16; q++)
          for (int64_t i = 0; i < m; i++) y[i * n + c0 + r + q * st] = f32_to_bf16(c[q * m + i]);
      }
      int64_t r0 = c0 + 16 * st, nr = n - c0 < 16 * TILE_STRIDE ? n - r0 : 0;  // < 16 rows
      for (int64_t i = 0; i < m && nr > 0; i++) {  // under 16 rows left: a shape no Llama has
        rows_bf16(x + i * k, xf + i * k, w + r0 * k, acc, nr, k);
        for (int64_t r = 0; r < nr; r++) y[i * n + r0 + r] = f32_to_bf16(acc[r]);
      }
    }
    _tile_loadconfig(&saved);
  }
  free(buf);
}

static int amx_ready = 0;
#endif

// 1 where this build has AMX-BF16 and the kernel lets this process use tile data (Linux asks each
// process to request it: arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), else 0.
int amx_bf16_enable(void) {
#if HAVE_AMX
  if (!amx_ready) amx_ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return amx_ready;
#else
  return 0;
#endif
}

// use_amx: the AMX path where amx_bf16_enable() said yes and the shape allows (k a multiple of 32, m <= 16).
void gemv_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t n, int64_t k, int use_amx) {
  float* xf = NULL;  // activations widened once, only where rows take the portable path
#if defined(__AVX512BF16__)
  if (k % 32 != 0 || n % GROUP != 0)
#endif
  {
    xf = malloc(sizeof(float) * m * k);
    if (!xf) abort();
    for (int64_t j = 0; j < m * k; j++) xf[j] = bf16_to_f32(x[j]);
  }
#if HAVE_AMX
  if (use_amx && amx_ready && k % 32 == 0 && m <= 16) {
    gemv_bf16_amx(x, xf, w, y, m, n, k);
    free(xf);
    return;
  }
#endif
  (void)use_amx;
  #pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
    int64_t nr = n - r0 < ROWS ? n - r0 : ROWS;
    float acc[ROWS];
    for (int64_t i = 0; i < m; i++) {
      rows_bf16(x + i * k, xf + i * k, w + r0 * k, acc, nr, k);
      for (int64_t r = 0; r < nr; r++) y[i * n + r0 + r] = f32_to_bf16(acc[r]);
    }
  }
  free(xf);
}

// w8a8: each x row quantized to int8 (symmetric, scale max|x| / 127, round to nearest even), w [n, k]
// int8 with a per-row scale sw; y = sx * sw * (xq . wq), the dot product exact in int32. AVX512-VNNI's
// vpdpbusd multiplies unsigned by signed bytes, so it takes xq + 128 and subtracts 128 * sum(w row) (wsum).
// GROUP rows side by side, as for fp32 and bf16.
static void rows_i8(const int8_t* xq, const uint8_t* xu, const int8_t* w, const int32_t* wsum, int32_t* acc,
                    int64_t nr, int64_t k) {
  int64_t r = 0;
#if defined(__AVX512VNNI__)
  if (k % 64 == 0) {
    for (; r + GROUP <= nr; r += GROUP) {
      const int8_t *w0 = w + r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k; j += 64) {
        __m512i xv = _mm512_loadu_si512(xu + j);
        a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512(w0 + j));
        a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512(w1 + j));
        a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512(w2 + j));
        a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512(w3 + j));
      }
      acc[r] = _mm512_reduce_add_epi32(a0) - 128 * wsum[r];
      acc[r + 1] = _mm512_reduce_add_epi32(a1) - 128 * wsum[r + 1];
      acc[r + 2] = _mm512_reduce_add_epi32(a2) - 128 * wsum[r + 2];
      acc[r + 3] = _mm512_reduce_add_epi32(a3) - 128 * wsum[r + 3];
    }
  }
#endif
  (void)xu; (void)wsum;
  for (; r < nr; r++) {
    const int8_t* wr = w + r * k;
    int32_t s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < k; j++) s += (int32_t)xq[j] * (int32_t)wr[j];
    acc[r] = s;
  }
}

void gemv_w8a8(const float* x, const int8_t* w, const float* sw, const int32_t* wsum, float* y,
               int64_t m, int64_t n, int64_t k) {
  int8_t* xq = malloc(m * k);
  uint8_t* xu = malloc(m * k);
  float* sx = malloc(sizeof(float) * m);
  if (!xq || !xu || !sx) abort();  // a few KB: out of memory here means the process is lost anyway
  for (int64_t i = 0; i < m; i++) {
    const float* xi = x + i * k;
    float amax = 0;
    #pragma omp simd reduction(max:amax)
    for (int64_t j = 0; j < k; j++) amax = fmaxf(amax, fabsf(xi[j]));
    sx[i] = amax > 0 ? amax / 127 : 1;
    #pragma omp simd
    for (int64_t j = 0; j < k; j++) {  // x / sx, as the Python path for longer inputs divides
      int32_t q = (int32_t)fminf(fmaxf(nearbyintf(xi[j] / sx[i]), -127.f), 127.f);
      xq[i * k + j] = (int8_t)q;
      xu[i * k + j] = (uint8_t)(q + 128);
    }
  }
  #pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
    int64_t nr = n - r0 < ROWS ? n - r0 : ROWS;
    int32_t acc[ROWS];
    for (int64_t i = 0; i < m; i++) {
      rows_i8(xq + i * k, xu + i * k, w + r0 * k, wsum + r0, acc, nr, k);
      for (int64_t r = 0; r < nr; r++) y[i * n + r0 + r] = (float)acc[r] * sx[i] * sw[r0 + r];
    }
  }
  free(xq); free(xu); free(sx);
}

// Sum of n floats: the read-bandwidth probe, with the access pattern of either kind of kernel: threads take
// blocks of `streams` (1 or 4) 16 KB stretches read side by side. On a 2-core Xeon with 4 KB pages one
// stream per thread read 23 GB/s and four 30; on huge pages both read about 30.
float read_f32(const float* a, int64_t n, int64_t streams) {
  const int64_t len = 4096, nb = n / (streams * len);
  float tot = 0;
  #pragma omp parallel for reduction(+:tot) schedule(static)
  for (int64_t b = 0; b < nb; b++) {
    const float* p = a + b * streams * len;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    if (streams == 4) {
      #pragma omp simd reduction(+:s0, s1, s2, s3)
      for (int64_t j = 0; j < len; j++) { s0 += p[j]; s1 += p[len + j]; s2 += p[2 * len + j]; s3 += p[3 * len + j]; }
    } else {
      #pragma omp simd reduction(+:s0)
      for (int64_t j = 0; j < len; j++) s0 += p[j];
    }
    tot += (s0 + s1) + (s2 + s3);
  }
  float tail = 0;  // under one block: a norm's weight, or the end of a tensor of no Llama shape
  #pragma omp simd reduction(+:tail)
  for (int64_t j = nb * streams * len; j < n; j++) tail += a[j];
  return tot + tail;
}

// Which paths this build has, for the engine's description.
const char* gemv_paths(void) {
  return "fp32: "
#if defined(__AVX512F__)
         "AVX-512 FMA"
#else
         "omp simd"
#endif
         "; bf16: "
#if defined(__AVX512BF16__)
         "AVX512-BF16 vdpbf16ps"
#if HAVE_AMX
         " or AMX tiles"
#endif
#else
         "widened to fp32, omp simd"
#endif
         "; int8: "
#if defined(__AVX512VNNI__)
         "AVX512-VNNI vpdpbusd";
#else
         "int32 omp simd";
#endif
}
