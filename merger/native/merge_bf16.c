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
 * Built by merger/native/__init__.py with the system's C compiler (-O3 -fopenmp-simd). */
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

CLONES
void merge_bf16(const uint16_t *restrict base, const float *restrict delta, uint16_t *restrict out,
                int64_t n, double *restrict sums, int64_t *restrict same)
{
    double w2 = 0.0, err2 = 0.0;
    int64_t eq = 0;
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
        w2 += bw2;
        err2 += berr2;
        eq += beq;
    }
    sums[0] += w2;
    sums[1] += err2;
    *same += eq;
}
