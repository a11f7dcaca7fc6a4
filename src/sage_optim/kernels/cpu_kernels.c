/* CPU kernels behind fused=True on CPU tensors (sage_optim/kernels/cpu.py builds and loads this file).
 *
 * The same four operations as the Triton kernels, one pass over memory each:
 *   sign_update        SAGE/Lion: read θ, g, m once, write θ, m once
 *   column_abs_sums    SAGE's statistic: Σ_rows |g| per column, one read of g
 *   sinkhorn_row_pass  one Sinkhorn iteration's row step and the column sums it feeds: per row, the row
 *                      norm with the current c, the new r, then r² (G/s)² added to the column sums while
 *                      the row is still in cache (SPEC §3's single pass)
 *   sinkgd_apply       θ ← θ·decay + f_i · G_ij · c_j, f_i = step · r_i / s
 *   max_abs            s = max |G|, one read
 * Every function exists for float32 (suffix _f32) and float64 (_f64) tensors; bf16 momentum is passed as its
 * 16-bit pattern and rounded to nearest-even on store, exactly as torch's copy_ rounds.
 * Threads: OpenMP, the runtime torch itself loaded (same soname), with the count passed in from torch.
 * Sums are accumulated in double. Compiled with -ffp-contract=off so that a*b+c is never fused: the
 * element-wise update then rounds exactly like the eager torch ops it replaces; and with -fno-math-errno
 * (nothing here reads errno), without which sqrtf is a call that stops vectorisation.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float out;
    memcpy(&out, &wide, sizeof out);
    return out;
}

static inline uint16_t f32_to_bf16(float value) {
    uint32_t wide;
    memcpy(&wide, &value, sizeof wide);
    if ((wide & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((wide >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((wide + 0x7fffu + ((wide >> 16) & 1u)) >> 16);
}

/* ---------------------------------------------------------------------------------------- SAGE / Lion */
/* One element of the sign step: θ ← θ·decay − lr·sign(m + w1·(g − m))·h and m ← m + w2·(g − m), in the
 * order code_compat asks for (torch's lerp for weights below 0.5 rounds exactly like m + w·(g − m)). */
#define SIGN_ELEMENT(T, pj, gj, mj, hj)                                                                       \
    do {                                                                                                      \
        /* both orders computed and one selected: no branch, so the loop vectorises */                       \
        const T first = code_compat ? mj + w2 * (gj - mj) : mj;                                               \
        const T direction = first + w1 * (gj - first);                                                        \
        mj = code_compat ? first : mj + w2 * (gj - mj);                                                       \
        T sign = direction > 0 ? (T)1 : (direction < 0 ? (T)-1 : (T)0);                                        \
        T step = damper ? sign * (hj) : sign;                                                                 \
        T decayed = (pj) * decay_t;                                                                           \
        (pj) = decayed - lr_t * step;                                                                         \
    } while (0)

#define SIGN_UPDATE(NAME, T, M_T, LOAD_M, STORE_M)                                                           \
    void NAME(T *param, const T *grad, M_T *exp_avg, const T *damper, int64_t rows, int64_t cols, double lr,  \
              double decay, double weight1, double weight2, int code_compat, int threads) {                   \
        const T lr_t = (T)lr, decay_t = (T)decay, w1 = (T)weight1, w2 = (T)weight2;                            \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                     \
        for (int64_t r = 0; r < rows; ++r) {                                                                  \
            T *p = param + r * cols;                                                                          \
            const T *g = grad + r * cols;                                                                     \
            M_T *m = exp_avg + r * cols;                                                                      \
            for (int64_t j = 0; j < cols; ++j) {                                                              \
                T mj = LOAD_M(m[j]);                                                                          \
                SIGN_ELEMENT(T, p[j], g[j], mj, damper ? damper[j] : (T)1);                                   \
                m[j] = STORE_M(mj);                                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }

#define SAME(x) (x)
SIGN_UPDATE(sign_update_f32, float, float, SAME, SAME)
SIGN_UPDATE(sign_update_f64, double, double, SAME, SAME)
SIGN_UPDATE(sign_update_f32_bf16m, float, uint16_t, bf16_to_f32, f32_to_bf16)

/* The same step with an 8-bit momentum (functional/_quant.py): per block of Q8_BLOCK elements of a row, m is
 * decoded as sign(k)·k²/127²·a, stepped as above, and stored again: the block's new largest |m| becomes a,
 * and each t = |m|/a is rounded up or down between (k/127)² and ((k+1)/127)² with the counter-based uniform
 * number of its flat index — the same operations, in the same float32 order, as the torch path. */
#define Q8_BLOCK 256
#define Q8_LEVELS 127.0f
static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    return x ^ (x >> 16);
}

/* damper: never NULL here (Lion passes ones: sign · 1 is exact), so that the loop has no branch on it.
 * first_index0: the flat index of param[0] in its whole tensor (a dim-0 shard's first row, else 0). */
void sign_update_q8_f32(float *param, const float *grad, int8_t *codes, float *absmax, const float *damper,
                        int64_t rows, int64_t cols, double lr, double decay, double weight1, double weight2,
                        int code_compat, int64_t key, int64_t first_index0, int threads) {
    const float lr_t = (float)lr, decay_t = (float)decay, w1 = (float)weight1, w2 = (float)weight2;
    const int64_t blocks = (cols + Q8_BLOCK - 1) / Q8_BLOCK;
    const uint32_t key_bits = (uint32_t)key;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t r = 0; r < rows; ++r) {
        float fresh[Q8_BLOCK];
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t start = b * Q8_BLOCK, length = cols - start < Q8_BLOCK ? cols - start : Q8_BLOCK;
            float *p = param + r * cols + start;
            const float *g = grad + r * cols + start;
            int8_t *k = codes + r * cols + start;
            const float a = absmax[r * blocks + b];
            float largest = 0;
            _Pragma("omp simd reduction(max:largest)")
            for (int64_t j = 0; j < length; ++j) {
                const float code = (float)k[j];
                float mj = code * fabsf(code) / (Q8_LEVELS * Q8_LEVELS) * a;
                SIGN_ELEMENT(float, p[j], g[j], mj, damper[start + j]);
                fresh[j] = mj;
                largest = fabsf(mj) > largest ? fabsf(mj) : largest;
            }
            absmax[r * blocks + b] = largest;
            const float scale = largest > 0 ? largest : 1.0f;
            const uint32_t first_index = (uint32_t)((uint64_t)(first_index0 + r * cols + start) & 0xFFFFFFFFu);
            int32_t levels[Q8_BLOCK];
            _Pragma("omp simd")
            for (int32_t j = 0; j < (int32_t)length; ++j) {
                const float t = fabsf(fresh[j]) / scale;
                float lower = (float)(int32_t)(sqrtf(t) * Q8_LEVELS); /* ≥ 0: truncation is floor (floorf does not vectorise) */
                lower = lower > Q8_LEVELS ? Q8_LEVELS : lower;
                const float low = lower / Q8_LEVELS, high = (lower + 1.0f) / Q8_LEVELS;
                const float low_value = low * low;
                const float up = (t - low_value) / (high * high - low_value);
                const uint32_t bits = hash32((first_index + (uint32_t)j) ^ key_bits) >> 8;
                const float u = (float)(int32_t)bits * 5.9604644775390625e-08f; /* 2^-24 */
                float level = lower + (u < up ? 1.0f : 0.0f);
                level = level > Q8_LEVELS ? Q8_LEVELS : level;
                const float sign = fresh[j] > 0 ? 1.0f : (fresh[j] < 0 ? -1.0f : 0.0f);
                levels[j] = (int32_t)(level * sign);
            }
            for (int64_t j = 0; j < length; ++j) k[j] = (int8_t)levels[j];
        }
    }
}

/* out[j] = Σ_t partial[t][j]: the per-thread column sums of a pass, combined in a fixed order. */
static void sum_thread_partials(const double *partial, double *out, int threads, int64_t cols) {
    for (int64_t j = 0; j < cols; ++j) {
        double total = 0;
        for (int t = 0; t < threads; ++t) total += partial[(int64_t)t * cols + j];
        out[j] = total;
    }
}

/* ---------------------------------------------------------------------------------------- statistic */
/* Rows are summed in float32 over blocks of STAT_BLOCK rows (16 lanes per instruction; the for-loop path sums
 * float32 blocks too) and each block's sums added into a float64 total. A block sum overflows only for |g|
 * near float32's max / STAT_BLOCK; then the whole statistic is redone in float64. */
#define STAT_BLOCK 256
/* Each thread reads its rows as two streams (the two halves of its share, a row of each in turn, each with its
 * own block sums), as max_abs does: one stream per core leaves memory bandwidth unused. */
#define COLUMN_ABS_SUMS(NAME, T, BLOCK_T)                                                                     \
    static int NAME##_pass(const T *matrix, double *out, int64_t rows, int64_t cols, int threads,            \
                           int wide) {                                                                        \
        if (threads < 1) threads = 1;                                                                         \
        const size_t slots = 2 * (size_t)threads * (size_t)cols; /* two streams per thread */                 \
        double *partial = calloc(slots, sizeof(double));                                                      \
        /* one pass uses one kind of block sums: float32 (BLOCK_T), or float64 when redone wide */            \
        BLOCK_T *blocks = wide ? NULL : calloc(slots, sizeof(BLOCK_T));                                       \
        double *wide_blocks = wide ? calloc(slots, sizeof(double)) : NULL;                                    \
        if (!partial || (wide ? !wide_blocks : !blocks)) {                                                    \
            free(partial); free(blocks); free(wide_blocks); return 1;                                         \
        }                                                                                                     \
        _Pragma("omp parallel num_threads(threads)")                                                          \
        {                                                                                                     \
            THREAD_ROWS(t, first, last, rows);                                                                \
            const int64_t middle = first + (last - first) / 2;                                                \
            const int64_t begin[2] = {first, middle}, end[2] = {middle, last};                                \
            for (int64_t offset = 0; offset < last - middle; offset += STAT_BLOCK) {                          \
                for (int64_t k = offset; k < offset + STAT_BLOCK; ++k) {                                      \
                    for (int stream = 0; stream < 2; ++stream) {                                              \
                        const int64_t r = begin[stream] + k, slot = (2 * (int64_t)t + stream) * cols;         \
                        if (r >= end[stream]) continue;                                                       \
                        const T *row = matrix + r * cols;                                                     \
                        if (wide) {                                                                           \
                            for (int64_t j = 0; j < cols; ++j) wide_blocks[slot + j] += fabs((double)row[j]); \
                        } else {                                                                              \
                            for (int64_t j = 0; j < cols; ++j) blocks[slot + j] += (BLOCK_T)fabs(row[j]);     \
                        }                                                                                     \
                    }                                                                                         \
                }                                                                                             \
                for (int64_t j = (2 * (int64_t)t) * cols; j < (2 * (int64_t)t + 2) * cols; ++j) {            \
                    if (wide) { partial[j] += wide_blocks[j]; wide_blocks[j] = 0; }                           \
                    else { partial[j] += (double)blocks[j]; blocks[j] = 0; }                                  \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        sum_thread_partials(partial, out, 2 * threads, cols);                                                 \
        free(partial); free(blocks); free(wide_blocks);                                                       \
        return 0;                                                                                             \
    }                                                                                                         \
    int NAME(const T *matrix, double *out, int64_t rows, int64_t cols, int threads) {                         \
        if (NAME##_pass(matrix, out, rows, cols, threads, 0)) return 1;                                       \
        for (int64_t j = 0; j < cols; ++j)                                                                    \
            if (!isfinite(out[j])) return NAME##_pass(matrix, out, rows, cols, threads, 1);                   \
        return 0;                                                                                             \
    }

#ifdef _OPENMP
#include <omp.h>
#define GET_THREAD(t, nt) do { t = omp_get_thread_num(); nt = omp_get_num_threads(); } while (0)
#else
#define GET_THREAD(t, nt) do { t = 0; nt = 1; } while (0)
#endif
/* Inside a parallel region: this thread's number t and its share [first, last) of the rows. */
#define THREAD_ROWS(t, first, last, rows)                                                                     \
    int t = 0, t##_count = 1;                                                                                 \
    GET_THREAD(t, t##_count);                                                                                 \
    const int64_t first = (rows) * t / t##_count, last = (rows) * (t + 1) / t##_count

COLUMN_ABS_SUMS(column_abs_sums_f32, float, float)
COLUMN_ABS_SUMS(column_abs_sums_f64, double, double)

/* ---------------------------------------------------------------------------------------- max |G| */
/* max |x| over n elements: NaN if any element is NaN, 0 for none or all zero. One threaded read, no
 * temporaries (torch's aminmax took 25% of a SinkGD step at 768 x 2048). SinkGD's s is this value, or 1
 * where it is 0 or NaN (cpu.py); the optimizer's finite check reads it too, so G is not read twice.
 * Each thread reads its share as two interleaved streams (the two halves, 256 elements of each in turn): one
 * stream per core left memory bandwidth unused on these machines (a 98 MB read: 8.4 ms, 7.2 ms with two
 * streams; measured 2026-11-30). max is exact in any order, so the result is the same. */
#define MAX_STREAM_CHUNK 256
#define MAX_ABS(NAME, T)                                                                                      \
    double NAME(const T *x, int64_t n, int threads) {                                                        \
        T largest = 0;                                                                                        \
        int nan_seen = 0;                                                                                     \
        if (threads < 1) threads = 1;                                                                         \
        _Pragma("omp parallel num_threads(threads) reduction(max:largest) reduction(|:nan_seen)")            \
        {                                                                                                     \
            THREAD_ROWS(t, first, last, n);                                                                   \
            const int64_t half = ((last - first) / 2) / MAX_STREAM_CHUNK * MAX_STREAM_CHUNK;                 \
            const T *a = x + first, *b = x + first + half;                                                    \
            T big = 0;                                                                                        \
            int nan_here = 0;                                                                                 \
            for (int64_t i = 0; i < half; i += MAX_STREAM_CHUNK) {                                            \
                _Pragma("omp simd reduction(max:big) reduction(|:nan_here)")                                  \
                for (int64_t j = i; j < i + MAX_STREAM_CHUNK; ++j) {                                          \
                    const T u = a[j], v = b[j], mu = fabs(u), mv = fabs(v);                                   \
                    big = mu > big ? mu : big;                                                                \
                    big = mv > big ? mv : big;                                                                \
                    nan_here |= (u != u) | (v != v);                                                          \
                }                                                                                             \
            }                                                                                                 \
            _Pragma("omp simd reduction(max:big) reduction(|:nan_here)")                                      \
            for (int64_t i = first + 2 * half; i < last; ++i) {                                               \
                const T magnitude = fabs(x[i]);                                                               \
                big = magnitude > big ? magnitude : big;                                                      \
                nan_here |= x[i] != x[i];                                                                     \
            }                                                                                                 \
            largest = big;                                                                                    \
            nan_seen = nan_here;                                                                              \
        }                                                                                                     \
        return nan_seen ? NAN : (double)largest;                                                              \
    }

MAX_ABS(max_abs_f32, float)
MAX_ABS(max_abs_f64, double)

/* ---------------------------------------------------------------------------------------- SinkGD */
/* rows_scaling (n) is updated in place: r ← min(r / (r·sqrt(Σ_j (G_ij/s)² c_j²) + eps) · target, cap);
 * out (m) receives Σ_i r_i² (G_ij/s)² with the new r. col_squares (m) holds c². */
/* The sweep works on x = G/s with s = max |G| (x ∈ [-1, 1]) in the gradient's own precision T, as the
 * for-loop path does: float32 gradients get 16-lane float arithmetic. The caller caps r and c so that r², c²
 * ≤ T's max / (4 · length): every product and sum below stays finite. Row norms and the new r are computed in
 * float64; the column sums are accumulated in T over blocks of STAT_BLOCK rows, each block added into a
 * float64 total. UNSCALE(x) is x · (1/s) for float32 (1/s of a normal float32 fits a double, and is rounded
 * to T once) and x / s for float64 (1/s overflows for a subnormal s).
 * Rows go four at a time: four independent row-norm sums hide the add latency that one sum's dependency
 * chain exposes, and the column sums are loaded and stored once per four rows (added in row order, as one
 * row at a time would). 1.4-1.7x faster sweeps at Llama-130M shapes, measured on 2 cores. */
/* Row r's new scaling from its squared norm (float64), stored, and returned squared in T. */
#define ROW_SCALING_SQ(r, row_sq) row_scaling_sq(rows_scaling, (r), (double)(row_sq), eps, target, cap)
static inline double row_scaling_sq(double *rows_scaling, int64_t r, double row_sq, double eps, double target,
                                    double cap) {
    double scaling = rows_scaling[r];
    scaling = scaling / (scaling * sqrt(row_sq) + eps) * target;
    if (scaling > cap) scaling = cap;
    rows_scaling[r] = scaling;
    return scaling * scaling;
}

#define SINKHORN_ROW_PASS(NAME, T, UNSCALE)                                                                   \
    int NAME(const T *grad, double *rows_scaling, const double *col_squares, double *out, int64_t rows,       \
             int64_t cols, double grad_scale, double eps, double target, double cap, int threads) {           \
        if (threads < 1) threads = 1;                                                                         \
        double *partial = calloc((size_t)threads * (size_t)cols, sizeof(double));                            \
        T *blocks = calloc((size_t)threads * (size_t)cols, sizeof(T));                                       \
        T *col_squares_t = malloc(sizeof(T) * (size_t)(cols > 0 ? cols : 1));                                 \
        if (!partial || !blocks || !col_squares_t) { free(partial); free(blocks); free(col_squares_t); return 1; } \
        for (int64_t j = 0; j < cols; ++j) col_squares_t[j] = (T)col_squares[j];                              \
        const T inv_scale = (T)(1.0 / grad_scale); (void)inv_scale;                                          \
        const T scale_t = (T)grad_scale; (void)scale_t;                                                      \
        _Pragma("omp parallel num_threads(threads)")                                                          \
        {                                                                                                     \
            THREAD_ROWS(t, first, last, rows);                                                                \
            double *acc = partial + (int64_t)t * cols;                                                        \
            T *block = blocks + (int64_t)t * cols;                                                            \
            int64_t r = first;                                                                                \
            for (; r + 4 <= last; r += 4) {                                                                   \
                const T *row0 = grad + r * cols, *row1 = row0 + cols, *row2 = row1 + cols, *row3 = row2 + cols;\
                T sq0 = 0, sq1 = 0, sq2 = 0, sq3 = 0;                                                        \
                _Pragma("omp simd reduction(+:sq0,sq1,sq2,sq3)")                                              \
                for (int64_t j = 0; j < cols; ++j) {                                                          \
                    const T c2 = col_squares_t[j];                                                            \
                    T x0 = UNSCALE(row0[j]), x1 = UNSCALE(row1[j]), x2 = UNSCALE(row2[j]), x3 = UNSCALE(row3[j]);\
                    sq0 += x0 * x0 * c2; sq1 += x1 * x1 * c2; sq2 += x2 * x2 * c2; sq3 += x3 * x3 * c2;      \
                }                                                                                             \
                const T s0 = ROW_SCALING_SQ(r, sq0), s1 = ROW_SCALING_SQ(r + 1, sq1);                         \
                const T s2 = ROW_SCALING_SQ(r + 2, sq2), s3 = ROW_SCALING_SQ(r + 3, sq3);                     \
                for (int64_t j = 0; j < cols; ++j) {                                                          \
                    T x0 = UNSCALE(row0[j]), x1 = UNSCALE(row1[j]), x2 = UNSCALE(row2[j]), x3 = UNSCALE(row3[j]);\
                    block[j] = block[j] + s0 * (x0 * x0) + s1 * (x1 * x1) + s2 * (x2 * x2) + s3 * (x3 * x3); \
                }                                                                                             \
                if ((r + 3 - first) % STAT_BLOCK == STAT_BLOCK - 1 || r + 3 == last - 1) {                   \
                    for (int64_t j = 0; j < cols; ++j) { acc[j] += (double)block[j]; block[j] = 0; }         \
                }                                                                                             \
            }                                                                                                 \
            for (; r < last; ++r) {                                                                           \
                const T *row = grad + r * cols;                                                               \
                T row_sq = 0;                                                                                 \
                _Pragma("omp simd reduction(+:row_sq)")                                                       \
                for (int64_t j = 0; j < cols; ++j) {                                                          \
                    T x = UNSCALE(row[j]);                                                                    \
                    row_sq += x * x * col_squares_t[j];                                                       \
                }                                                                                             \
                const T scaling_sq = ROW_SCALING_SQ(r, row_sq);                                               \
                for (int64_t j = 0; j < cols; ++j) {                                                          \
                    T x = UNSCALE(row[j]);                                                                    \
                    block[j] += scaling_sq * (x * x);                                                         \
                }                                                                                             \
                if ((r - first) % STAT_BLOCK == STAT_BLOCK - 1 || r == last - 1) {                           \
                    for (int64_t j = 0; j < cols; ++j) { acc[j] += (double)block[j]; block[j] = 0; }         \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        sum_thread_partials(partial, out, threads, cols);                                                     \
        free(partial); free(blocks); free(col_squares_t);                                                     \
        return 0;                                                                                             \
    }

#define TIMES_INVERSE(x) ((x) * inv_scale)
#define DIVIDED(x) ((x) / scale_t)
SINKHORN_ROW_PASS(sinkhorn_row_pass_f32, float, TIMES_INVERSE)
SINKHORN_ROW_PASS(sinkhorn_row_pass_f64, double, DIVIDED)

/* θ_ij ← θ_ij·decay + (step·r_i) · ((G_ij/s) · c_j); cols_scaling in θ's compute type. G/s first, as in the
 * sweep: G_ij · c_j itself can overflow (G near T's max and c > 1). */
#define SINKGD_APPLY(NAME, T, UNSCALE)                                                                        \
    void NAME(T *param, const T *grad, const double *rows_scaling, const T *cols_scaling, int64_t rows,       \
              int64_t cols, double decay, double step, double grad_scale, int threads) {                      \
        const T decay_t = (T)decay;                                                                           \
        const T inv_scale = (T)(1.0 / grad_scale); (void)inv_scale;                                          \
        const T scale_t = (T)grad_scale; (void)scale_t;                                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                     \
        for (int64_t r = 0; r < rows; ++r) {                                                                  \
            const T factor = (T)(step * rows_scaling[r]);                                                     \
            T *p = param + r * cols;                                                                          \
            const T *g = grad + r * cols;                                                                     \
            for (int64_t j = 0; j < cols; ++j) p[j] = p[j] * decay_t + factor * (UNSCALE(g[j]) * cols_scaling[j]);\
        }                                                                                                     \
    }

SINKGD_APPLY(sinkgd_apply_f32, float, TIMES_INVERSE)
SINKGD_APPLY(sinkgd_apply_f64, double, DIVIDED)

/* One whole SinkGD step of an unsharded matrix in one call: L row passes, each followed by the column step
 * c ← min(c / (c·sqrt(Σ_i r_i² (G_ij/s)²) + eps) · col_target, col_cap), then the apply. The first row step
 * uses eps/s (SPEC §3 with G/s; see functional/sinkgd.py). Python calls per matrix: one, not ~12 per
 * iteration — on CPU those calls cost more than the arithmetic of a 768 × 768 matrix. */
#define SINKGD_STEP(NAME, T, SUFFIX)                                                                          \
    int NAME(T *param, const T *grad, int64_t rows, int64_t cols, int iters, double grad_scale, double eps,   \
             double row_target, double col_target, double row_cap, double col_cap, double decay, double step, \
             int threads) {                                                                                   \
        double *row_scaling = malloc(sizeof(double) * (size_t)(rows > 0 ? rows : 1));                         \
        double *col_scaling = malloc(sizeof(double) * (size_t)(cols > 0 ? cols : 1));                         \
        double *col_squares = malloc(sizeof(double) * (size_t)(cols > 0 ? cols : 1));                         \
        double *col_sums = malloc(sizeof(double) * (size_t)(cols > 0 ? cols : 1));                            \
        T *col_scaling_t = malloc(sizeof(T) * (size_t)(cols > 0 ? cols : 1));                                 \
        if (!row_scaling || !col_scaling || !col_squares || !col_sums || !col_scaling_t) {                    \
            free(row_scaling); free(col_scaling); free(col_squares); free(col_sums); free(col_scaling_t);    \
            return 1;                                                                                         \
        }                                                                                                     \
        for (int64_t i = 0; i < rows; ++i) row_scaling[i] = 1.0;                                              \
        for (int64_t j = 0; j < cols; ++j) col_scaling[j] = col_squares[j] = 1.0;                             \
        for (int iteration = 0; iteration < iters; ++iteration) {                                             \
            if (sinkhorn_row_pass_##SUFFIX(grad, row_scaling, col_squares, col_sums, rows, cols, grad_scale,   \
                                           iteration == 0 ? eps / grad_scale : eps, row_target, row_cap,      \
                                           threads)) {                                                        \
                free(row_scaling); free(col_scaling); free(col_squares); free(col_sums); free(col_scaling_t);\
                return 1;                                                                                     \
            }                                                                                                 \
            for (int64_t j = 0; j < cols; ++j) {                                                              \
                double c = col_scaling[j];                                                                    \
                c = c / (c * sqrt(col_sums[j]) + eps) * col_target;                                           \
                if (c > col_cap) c = col_cap;                                                                 \
                col_scaling[j] = c;                                                                           \
                col_squares[j] = c * c;                                                                       \
            }                                                                                                 \
        }                                                                                                     \
        for (int64_t j = 0; j < cols; ++j) col_scaling_t[j] = (T)col_scaling[j];                              \
        sinkgd_apply_##SUFFIX(param, grad, row_scaling, col_scaling_t, rows, cols, decay, step, grad_scale,   \
                              threads);                                                                       \
        free(row_scaling); free(col_scaling); free(col_squares); free(col_sums); free(col_scaling_t);        \
        return 0;                                                                                             \
    }

SINKGD_STEP(sinkgd_step_f32, float, f32)
SINKGD_STEP(sinkgd_step_f64, double, f64)
