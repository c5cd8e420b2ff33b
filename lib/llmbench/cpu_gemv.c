// Decode-time linears on CPU: y[m, n] = sum_k x[m, k] * w[n, k] for a handful of rows m.
// Memory bound: every weight byte is read once per call; threads take blocks of ROWS weight rows, and
// each x row is reused from cache across a block. fp32 and bf16 stream one row at a time with four
// accumulators (5-10% faster here than eight rows side by side).
// Built by cpu_gemv.py with -O3 -march=native -fopenmp: the AVX-512 paths exist only where the CPU has
// them, the plain C loops (omp simd) vectorize anywhere.
// Threads: OpenMP, the same libgomp and thread count as torch in the calling process; rows are handed out
// in chunks of 4 blocks as threads free up (as llama.cpp does), so a vCPU the host pauses delays no one.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ROWS 8

// Software prefetch `ahead` bytes beyond each 256-byte step of a weight row. Rows are contiguous, so near
// a row's end it fetches the next row, across the 4 KB pages where hardware prefetchers stop. On a
// 2-core Xeon 1 KB ahead cut the time of 1B's linears by 4-13% in bf16, 5-10% in fp32, 1-2% in int8; whether
// it helps is a fact of the CPU, so cpu_gemv.py measures it per kernel and passes it in.
#if defined(__AVX512F__)
static inline void prefetch_256(const void* p, int64_t ahead) {  // ahead 0: the lines about to be loaded
  const char* q = (const char*)p + ahead;  // a prefetch past the buffer's end does not fault
  _mm_prefetch(q, _MM_HINT_T0); _mm_prefetch(q + 64, _MM_HINT_T0);
  _mm_prefetch(q + 128, _MM_HINT_T0); _mm_prefetch(q + 192, _MM_HINT_T0);
}
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// acc[r] = dot(x, w row r) for nr <= ROWS rows of length k.
static void rows_f32(const float* x, const float* w, float* acc, int64_t nr, int64_t k, int64_t ahead) {
#if defined(__AVX512F__)
  if (k % 64 == 0) {  // one row at a time, 4 accumulators: one stream per thread read fastest here
    for (int64_t r = 0; r < nr; r++) {
      const float* wr = w + r * k;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k; j += 64) {
        prefetch_256(wr + j, ahead);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + j + 48), _mm512_loadu_ps(x + j + 48), a3);
      }
      acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    return;
  }
#endif
  for (int64_t r = 0; r < nr; r++) {
    const float* wr = w + r * k;
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < k; j++) s += wr[j] * x[j];
    acc[r] = s;
  }
}

// Same for bf16 weights and activations; products and sums in fp32.
static void rows_bf16(const uint16_t* x, const float* xf, const uint16_t* w, float* acc, int64_t nr, int64_t k,
                      int64_t ahead) {
#if defined(__AVX512BF16__)
  if (k % 128 == 0) {  // vdpbf16ps: 32 bf16 products per instruction, exact in fp32; one row at a time
    for (int64_t r = 0; r < nr; r++) {
      const uint16_t* wr = w + r * k;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < k; j += 128) {
        prefetch_256(wr + j, ahead);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + j), (__m512bh)_mm512_loadu_si512(x + j));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wr + j + 32), (__m512bh)_mm512_loadu_si512(x + j + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(wr + j + 64), (__m512bh)_mm512_loadu_si512(x + j + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(wr + j + 96), (__m512bh)_mm512_loadu_si512(x + j + 96));
      }
      acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    return;
  }
#endif
  (void)x;
  for (int64_t r = 0; r < nr; r++) {
    const uint16_t* wr = w + r * k;
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < k; j++) s += bf16_to_f32(wr[j]) * xf[j];
    acc[r] = s;
  }
}

void gemv_f32(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k, int64_t ahead) {
  #pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
    int64_t nr = n - r0 < ROWS ? n - r0 : ROWS;
    float acc[ROWS];
    for (int64_t i = 0; i < m; i++) {
      rows_f32(x + i * k, w + r0 * k, acc, nr, k, ahead);
      for (int64_t r = 0; r < nr; r++) y[i * n + r0 + r] = acc[r];
    }
  }
}

void gemv_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t n, int64_t k, int64_t ahead) {
  float* xf = NULL;  // activations widened once, only for the portable path
#if defined(__AVX512BF16__)
  if (k % 128 != 0)
#endif
  {
    xf = malloc(sizeof(float) * m * k);
    if (!xf) abort();
    for (int64_t j = 0; j < m * k; j++) xf[j] = bf16_to_f32(x[j]);
  }
  #pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
    int64_t nr = n - r0 < ROWS ? n - r0 : ROWS;
    float acc[ROWS];
    for (int64_t i = 0; i < m; i++) {
      rows_bf16(x + i * k, xf + i * k, w + r0 * k, acc, nr, k, ahead);
      for (int64_t r = 0; r < nr; r++) y[i * n + r0 + r] = f32_to_bf16(acc[r]);
    }
  }
  free(xf);
}

// w8a8: each x row quantized to int8 (symmetric, scale max|x| / 127, round to nearest even), w [n, k]
// int8 with a per-row scale sw; y = sx * sw * (xq . wq), the dot product exact in int32. AVX512-VNNI's
// vpdpbusd multiplies unsigned by signed bytes, so it takes xq + 128 and subtracts 128 * sum(w row) (wsum).
// One weight row at a time with four accumulators, as for fp32 and bf16: one stream per thread read
// 10% faster here than eight rows side by side (89% against 80% of the read loop's rate).
static int32_t row_i8(const int8_t* xq, const uint8_t* xu, const int8_t* wr, int32_t wsum, int64_t k, int64_t ahead) {
#if defined(__AVX512VNNI__)
  if (k % 256 == 0) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k; j += 256) {
      prefetch_256(wr + j, ahead);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xu + j), _mm512_loadu_si512(wr + j));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(xu + j + 64), _mm512_loadu_si512(wr + j + 64));
      a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(xu + j + 128), _mm512_loadu_si512(wr + j + 128));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(xu + j + 192), _mm512_loadu_si512(wr + j + 192));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3))) - 128 * wsum;
  }
#endif
  (void)xu; (void)wsum; (void)ahead;
  int32_t s = 0;
  #pragma omp simd reduction(+:s)
  for (int64_t j = 0; j < k; j++) s += (int32_t)xq[j] * (int32_t)wr[j];
  return s;
}

void gemv_w8a8(const float* x, const int8_t* w, const float* sw, const int32_t* wsum, float* y,
               int64_t m, int64_t n, int64_t k, int64_t ahead) {
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
  #pragma omp parallel for schedule(dynamic, 4 * ROWS)
  for (int64_t r = 0; r < n; r++)
    for (int64_t i = 0; i < m; i++)
      y[i * n + r] = (float)row_i8(xq + i * k, xu + i * k, w + r * k, wsum[r], k, ahead) * sx[i] * sw[r];
  free(xq); free(xu); free(sx);
}

// Sum of n floats in 4096-float blocks split over the threads: the read-bandwidth probe.
float read_f32(const float* a, int64_t n) {
  float tot = 0;
  #pragma omp parallel for reduction(+:tot) schedule(static)
  for (int64_t b = 0; b < n; b += 4096) {
    int64_t e = b + 4096 < n ? b + 4096 : n;
    float s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t j = b; j < e; j++) s += a[j];
    tot += s;
  }
  return tot;
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
