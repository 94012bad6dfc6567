/* One pass over a chunk of a bfloat16 weight and its float32 LoRA delta:
 *   out = round_bf16(float(base) + delta)
 * gathering the rounding statistics on the way: the sum of squares of the merged float32 values, the
 * sum of squared rounding errors, and how many outputs equal the base bit for bit. torch needs six
 * passes over the chunk for the same (upcast, add, sum of squares, round, compare, error).
 *
 * Rounding is round-to-nearest-even on the float32 bits, as torch's c10::BFloat16 does, so outputs are
 * bit-identical to torch's `.to(torch.bfloat16)` for finite values. NaN/Inf are not special-cased:
 * they make the sums non-finite and the caller refuses the tensor.
 *
 * merge_lora_bf16 is the same pass with the delta built from the LoRA factors in cache (the merge's
 * hot loop); hash_in_turn passes the output's sha256 from merge worker to merge worker in file order
 * (merger/ordered.py).
 *
 * Built by merger/native/__init__.py with the system's C compiler (-O3 -fopenmp-simd -lm). */
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SWITCHYARD_NO_CLONES)
/* one build for every x86-64 machine: the loader picks the widest vectors the CPU has */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Blocks short enough for float sums and 16-bit counts to be exact enough (counts exact, sums
 * to ~1e-7 relative); their totals are added in double. Wider accumulators inside the loop halve
 * the vector width and double the time. */
#define BLOCK 1024
#define SPINS 256 /* hash_in_turn's busy waits before it yields: ~10-40 us */

/* The pass over n elements: out = round_bf16(float(base) + delta), with the sums and the count. Cloned
 * itself: gcc does not inline it into the callers' clones, and its default build is a third as fast. */
CLONES static void merge_pass(const uint16_t *restrict base, const float *restrict delta, uint16_t *restrict out,
                              int64_t n, double *w2, double *err2, int64_t *eq)
{
    for (int64_t s = 0; s < n; s += BLOCK) {
        const int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const uint16_t *b = base + s;
        const float *d = delta + s;
        uint16_t *o = out + s;
        float bw2 = 0.f, berr2 = 0.f;
        uint16_t beq = 0;
#pragma omp simd reduction(+ : bw2, berr2, beq)
        for (int64_t i = 0; i < m; i++) {
            uint32_t wbits = (uint32_t)b[i] << 16;
            float w;
            memcpy(&w, &wbits, 4);
            float x = w + d[i];
            uint32_t u;
            memcpy(&u, &x, 4);
            uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            o[i] = r;
            beq += (uint16_t)(r == b[i]);
            uint32_t rbits = (uint32_t)r << 16;
            float rf;
            memcpy(&rf, &rbits, 4);
            float e = rf - x;
            bw2 += x * x;
            berr2 += e * e;
        }
        *w2 += bw2;
        *err2 += berr2;
        *eq += beq;
    }
}

CLONES
void merge_bf16(const uint16_t *restrict base, const float *restrict delta, uint16_t *restrict out,
                int64_t n, double *restrict sums, int64_t *restrict same)
{
    double w2 = 0.0, err2 = 0.0;
    int64_t eq = 0;
    merge_pass(base, delta, out, n, &w2, &err2, &eq);
    sums[0] += w2;
    sums[1] += err2;
    *same += eq;
}

/* One row of a LoRA delta: row[j] = sum over r = 0..rank-1 of l[r] * R[r][j], by fused multiply-adds in
 * that order (as BLAS's sgemm kernels sum a product: the same float32 delta as the GEMM, checked by
 * tests/merger/test_native.py). */
static void lora_row(const float *restrict l, const float *restrict R, int64_t rank, int64_t cols, int64_t j0,
                     float *restrict row)
{
#pragma omp simd
    for (int64_t j = j0; j < cols; j++) {
        float a = 0.f;
        for (int64_t r = 0; r < rank; r++)
            a = fmaf(l[r], R[r * cols + j], a);
        row[j] = a;
    }
}

#define ROWS 4 /* rows of the delta built together: each load of R serves ROWS FMAs */

/* Which routine builds the delta rows: the widest this CPU has, at most `merge_lora_isa` (2: AVX-512,
 * 1: AVX2 + FMA, 0: portable C; tests lower it to check each against the GEMM). All sum in the same
 * order, so all give the same bits. */
int merge_lora_isa = 2;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(SWITCHYARD_NO_CLONES)
#include <immintrin.h>
#define HAVE_X86_ROWS 1
/* ROWS rows at once, 64 columns at a time, in sixteen 16-float accumulators: each R vector loaded
 * once for ROWS rows (R is read from L2 for every row otherwise: a third of the speed), and sixteen
 * FMA chains in flight hide the FMA's latency. Same sums in the same order as lora_row. */
__attribute__((target("avx512f"))) static void lora_rows_avx512(const float *restrict l, const float *restrict R,
                                                                 int64_t rank, int64_t cols, float *restrict rows)
{
    int64_t j0 = 0;
    for (; j0 + 64 <= cols; j0 += 64) {
        __m512 acc[ROWS][4];
        for (int i = 0; i < ROWS; i++)
            for (int v = 0; v < 4; v++)
                acc[i][v] = _mm512_setzero_ps();
        for (int64_t r = 0; r < rank; r++) {
            const float *p = R + r * cols + j0;
            const __m512 y0 = _mm512_loadu_ps(p), y1 = _mm512_loadu_ps(p + 16), y2 = _mm512_loadu_ps(p + 32),
                         y3 = _mm512_loadu_ps(p + 48);
            for (int i = 0; i < ROWS; i++) {
                const __m512 x = _mm512_set1_ps(l[i * rank + r]);
                acc[i][0] = _mm512_fmadd_ps(x, y0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(x, y1, acc[i][1]);
                acc[i][2] = _mm512_fmadd_ps(x, y2, acc[i][2]);
                acc[i][3] = _mm512_fmadd_ps(x, y3, acc[i][3]);
            }
        }
        for (int i = 0; i < ROWS; i++)
            for (int v = 0; v < 4; v++)
                _mm512_storeu_ps(rows + i * cols + j0 + 16 * v, acc[i][v]);
    }
    for (int i = 0; i < ROWS; i++)
        lora_row(l + i * rank, R, rank, cols, j0, rows + i * cols);
}

/* The same with AVX2 + FMA: 16 columns at a time, eight 8-float accumulators (of 16 registers). */
__attribute__((target("avx2,fma"))) static void lora_rows_avx2(const float *restrict l, const float *restrict R,
                                                                int64_t rank, int64_t cols, float *restrict rows)
{
    int64_t j0 = 0;
    for (; j0 + 16 <= cols; j0 += 16) {
        __m256 acc[ROWS][2];
        for (int i = 0; i < ROWS; i++)
            acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int64_t r = 0; r < rank; r++) {
            const float *p = R + r * cols + j0;
            const __m256 y0 = _mm256_loadu_ps(p), y1 = _mm256_loadu_ps(p + 8);
            for (int i = 0; i < ROWS; i++) {
                const __m256 x = _mm256_set1_ps(l[i * rank + r]);
                acc[i][0] = _mm256_fmadd_ps(x, y0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(x, y1, acc[i][1]);
            }
        }
        for (int i = 0; i < ROWS; i++) {
            _mm256_storeu_ps(rows + i * cols + j0, acc[i][0]);
            _mm256_storeu_ps(rows + i * cols + j0 + 8, acc[i][1]);
        }
    }
    for (int i = 0; i < ROWS; i++)
        lora_row(l + i * rank, R, rank, cols, j0, rows + i * cols);
}
#endif

static int lora_isa(void)
{
#ifdef HAVE_X86_ROWS
    if (merge_lora_isa >= 2 && __builtin_cpu_supports("avx512f"))
        return 2;
    if (merge_lora_isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 1;
#endif
    return 0;
}

/* merge_bf16 for a LoRA delta given by its factors: rows x cols of
 *   out = round_bf16(float(base) + L @ R),  L: rows x rank, R: rank x cols (float32, row-major),
 * without the float32 delta leaving the cache: each ROWS rows' delta is built in `row` (ROWS x cols
 * floats, the caller's), then passed over. With `update` (not NULL), the output rows are also fed to
 * `update(ctx, ...)` (OpenSSL's EVP_DigestUpdate) about every HASH_BYTES, while still in L1/L2: -2
 * when an update fails, else 0. */
#define HASH_BYTES (32 << 10)
typedef int (*hash_update_fn)(void *ctx, const void *data, size_t n);

CLONES static int merge_rows(const uint16_t *restrict base, const float *restrict L, const float *restrict R,
                             int64_t rank, int64_t rows, int64_t cols, float *restrict row, uint16_t *restrict out,
                             double *restrict sums, int64_t *restrict same, hash_update_fn update, void *ctx)
{
    double w2 = 0.0, err2 = 0.0;
    int64_t eq = 0, unhashed = 0; /* rows done and not yet fed to `update` */
    const int isa = lora_isa();
    (void)isa; /* unused where only the portable routine is built */
    for (int64_t i = 0; i < rows; i += ROWS) {
        const int64_t m = rows - i < ROWS ? rows - i : ROWS;
#ifdef HAVE_X86_ROWS
        if (isa == 2 && m == ROWS)
            lora_rows_avx512(L + i * rank, R, rank, cols, row);
        else if (isa == 1 && m == ROWS)
            lora_rows_avx2(L + i * rank, R, rank, cols, row);
        else
#endif
            for (int64_t k = 0; k < m; k++)
                lora_row(L + (i + k) * rank, R, rank, cols, 0, row + k * cols);
        merge_pass(base + i * cols, row, out + i * cols, m * cols, &w2, &err2, &eq);
        if (update != NULL) {
            unhashed += m;
            if (unhashed * cols * 2 >= HASH_BYTES || i + m == rows) {
                if (update(ctx, out + (i + m - unhashed) * cols, (size_t)(unhashed * cols * 2)) != 1)
                    return -2;
                unhashed = 0;
            }
        }
    }
    sums[0] += w2;
    sums[1] += err2;
    *same += eq;
    return 0;
}

void merge_lora_bf16(const uint16_t *restrict base, const float *restrict L, const float *restrict R,
                     int64_t rank, int64_t rows, int64_t cols, float *restrict row, uint16_t *restrict out,
                     double *restrict sums, int64_t *restrict same)
{
    merge_rows(base, L, R, rank, rows, cols, row, out, sums, same, NULL, NULL);
}

/* Hash `n` bytes in file order across threads: wait until turn[0] == k (a few hundred spins, then
 * yielding the CPU), feed them to `update(ctx, data, n)` (OpenSSL's EVP_DigestUpdate) and pass the
 * turn on (k + 1). Called without the GIL, so the turn passes between the merge workers with no
 * Python, lock or futex in between (merger/ordered.py). Returns 0; -1 when turn[1] is set (another
 * thread failed: abort the wait); -2 when the update failed (turn[1] is then set for the others). */
int hash_in_turn(const void *data, int64_t n, int64_t *turn, int64_t k, hash_update_fn update, void *ctx)
{
    for (int spins = 0; __atomic_load_n(&turn[0], __ATOMIC_ACQUIRE) != k; spins++) {
        if (__atomic_load_n(&turn[1], __ATOMIC_RELAXED))
            return -1;
        if (spins < SPINS) {
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
    if (n > 0 && update(ctx, data, (size_t)n) != 1) {
        __atomic_store_n(&turn[1], 1, __ATOMIC_RELAXED);
        return -2;
    }
    __atomic_store_n(&turn[0], k + 1, __ATOMIC_RELEASE);
    return 0;
}

/* merge_lora_bf16 and hash_in_turn in one: when the turn to hash (turn[0] == k) is already this
 * thread's, as it is for a worker alone on its shard, the rows are hashed as they are computed, from
 * L1/L2 (the chunk hashed after it is computed is read back from further away: ~1.3 against ~1.8 GB/s
 * with both cores busy); else computed, then hashed in turn. Returns as hash_in_turn. */
int merge_lora_bf16_in_turn(const uint16_t *restrict base, const float *restrict L, const float *restrict R,
                            int64_t rank, int64_t rows, int64_t cols, float *restrict row, uint16_t *restrict out,
                            double *restrict sums, int64_t *restrict same, int64_t *turn, int64_t k,
                            hash_update_fn update, void *ctx)
{
    if (__atomic_load_n(&turn[1], __ATOMIC_RELAXED))
        return -1;
    if (__atomic_load_n(&turn[0], __ATOMIC_ACQUIRE) != k) {
        merge_rows(base, L, R, rank, rows, cols, row, out, sums, same, NULL, NULL);
        return hash_in_turn(out, rows * cols * 2, turn, k, update, ctx);
    }
    if (merge_rows(base, L, R, rank, rows, cols, row, out, sums, same, update, ctx) != 0) {
        __atomic_store_n(&turn[1], 1, __ATOMIC_RELAXED);
        return -2;
    }
    __atomic_store_n(&turn[0], k + 1, __ATOMIC_RELEASE);
    return 0;
}

/* 1 when merge_lora_bf16 has a vector routine for the delta rows on this CPU (AVX-512 or AVX2 + FMA);
 * else its portable loop runs at ~1/7 of a GEMM's speed and the caller builds the delta by GEMM. */
int merge_lora_vectorised(void)
{
    return lora_isa() > 0;
}
