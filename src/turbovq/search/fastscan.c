/* Compiled inner loops of TurboQuantIndex's CPU scan (see fastscan.py): decoding tiles of packed codes into the
 * matrix that BLAS multiplies, and merging each tile's scores into a running top-k. Both are a few instructions per
 * value in C but a dozen tensor passes in torch, which made them cost as much as the matrix product itself.
 *
 * Packing contract (packing.py): each row is a little-endian bit stream, code j in bits [b*j, b*j + b), LSB first.
 */
#include <stdint.h>
#include <math.h>
#ifdef __AVX512VBMI__
#include <immintrin.h>
#endif
#include <string.h>

#define TVQ_MAX_DIM 8192

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Little-endian word of the `len` (<= 8) bytes at p, assembled byte by byte: no read past the row's end (and no
 * partial-width memcpy through the stack, whose store-to-load forwarding stalls cost ~15 cycles a word). */
static inline uint64_t load_tail(const uint8_t *p, int len) {
    uint64_t w = 0;
    for (int k = 0; k < len; k++) w |= (uint64_t)p[k] << (8 * k);
    return w;
}

/* Codes of one row -> dim uint8 indices. Eight b-bit codes fill b bytes; `B` is a literal at every call site, so
 * each width compiles to its own loop with constant shifts. Whole 8-byte loads while they stay inside the row. */
static inline __attribute__((always_inline)) void unpack_row(const uint8_t *r, const int B, int dim, uint8_t *idx) {
    const int nbytes = (dim * B + 7) / 8, groups = (dim + 7) / 8;
    const uint64_t mask = (1u << B) - 1;
    int g = 0;
    for (; g < groups && g * B + 8 <= nbytes; g++) {
        uint64_t w;
        memcpy(&w, r + g * B, 8); /* little-endian hosts only (x86-64, aarch64) */
        for (int k = 0; k < 8; k++) idx[g * 8 + k] = (uint8_t)((w >> (k * B)) & mask);
    }
    for (; g < groups; g++) {
        const int at = g * B, len = nbytes - at < 8 ? nbytes - at : 8;
        const uint64_t w = load_tail(r + at, len);
        for (int k = 0; k < 8 && g * 8 + k < dim; k++) idx[g * 8 + k] = (uint8_t)((w >> (k * B)) & mask);
    }
}

static void unpack(const uint8_t *r, int bits, int dim, uint8_t *idx) {
    switch (bits) {
    case 1: unpack_row(r, 1, dim, idx); break;
    case 2: unpack_row(r, 2, dim, idx); break;
    case 3: unpack_row(r, 3, dim, idx); break;
    case 4: unpack_row(r, 4, dim, idx); break;
    case 5: unpack_row(r, 5, dim, idx); break;
    case 6: unpack_row(r, 6, dim, idx); break;
    case 7: unpack_row(r, 7, dim, idx); break;
    default: memcpy(idx, r, (size_t)dim);
    }
}

static inline int8_t to_i8(float x) {
    x = nearbyintf(x);
    return (int8_t)(x > 127.f ? 127.f : (x < -127.f ? -127.f : x));
}

/* o[j] = table[idx[j]]; with AVX-512 VBMI, tables of <= 64 entries take one byte-permute per 64 values. */
static inline void lookup_i8(const int8_t *table, int ncent, const uint8_t *idx, int dim, int8_t *o) {
    int j = 0;
#ifdef __AVX512VBMI__
    if (ncent <= 64) {
        int8_t t64[64] = {0};
        memcpy(t64, table, (size_t)ncent);
        const __m512i tv = _mm512_loadu_si512(t64);
        for (; j + 64 <= dim; j += 64)
            _mm512_storeu_si512(o + j, _mm512_permutexvar_epi8(_mm512_loadu_si512(idx + j), tv));
        if (j < dim) {
            const __mmask64 m = (~0ULL) >> (64 - (dim - j));
            _mm512_mask_storeu_epi8(o + j, m, _mm512_permutexvar_epi8(_mm512_maskz_loadu_epi8(m, idx + j), tv));
        }
        return;
    }
#endif
    (void)ncent;
    for (; j < dim; j++) o[j] = table[idx[j]];
}

/* out[i, j] = centroids[code_rj] * scales[r], r = rows[i] (or i if rows is NULL), for n rows of codes (row stride
 * `stride` bytes); out row stride `ostride` elements, of type `out_type`: 0 float32, 1 bfloat16 (as uint16), 2 int8
 * (rounded, clamped to +-127; the caller's scales put the values in range). Rows with more codes than centroids look their values up in a table
 * scaled once per row; the others scale each value. Returns -1 on an unsupported shape. */
int tvq_decode(const uint8_t *codes, const int64_t *rows, int64_t n, int64_t stride, int bits, int dim,
               const float *centroids, const float *scales, void *out, int64_t ostride, int out_type) {
    uint8_t idx[TVQ_MAX_DIM];
    uint16_t th[256];
    int8_t tb[256];
    if (dim > TVQ_MAX_DIM || bits < 1 || bits > 8 || out_type < 0 || out_type > 2) return -1;
    const int ncent = 1 << bits, per_row_table = ncent <= dim;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = rows ? rows[i] : i;
        const float s = scales[r];
        unpack(codes + r * stride, bits, dim, idx);
        if (out_type == 0) {
            float *o = (float *)out + i * ostride;
            for (int j = 0; j < dim; j++) o[j] = centroids[idx[j]] * s;
        } else if (out_type == 1) {
            uint16_t *o = (uint16_t *)out + i * ostride;
            if (per_row_table) {
                for (int c = 0; c < ncent; c++) th[c] = to_bf16(centroids[c] * s);
                for (int j = 0; j < dim; j++) o[j] = th[idx[j]];
            } else {
                for (int j = 0; j < dim; j++) o[j] = to_bf16(centroids[idx[j]] * s);
            }
        } else {
            int8_t *o = (int8_t *)out + i * ostride;
            if (per_row_table) {
                for (int c = 0; c < ncent; c++) tb[c] = to_i8(centroids[c] * s);
                lookup_i8(tb, ncent, idx, dim, o);
            } else {
                for (int j = 0; j < dim; j++) o[j] = to_i8(centroids[idx[j]] * s);
            }
        }
    }
    return 0;
}

static inline void insert(float *bs, int64_t *bp, int64_t keep, float s, int64_t pos) {
    int64_t at = keep - 1;
    while (at > 0 && bs[at - 1] < s) {
        bs[at] = bs[at - 1];
        bp[at] = bp[at - 1];
        at--;
    }
    bs[at] = s;
    bp[at] = pos;
}

/* One query row: blocks of 64 scores are first counted against the threshold in a branch-free (vectorised) pass;
 * only blocks holding a candidate are walked one by one. RAW(j) is the raw score, as float. */
#define MERGE_ROW(RAW)                                                                                             \
    for (int64_t j0 = 0; j0 < T; j0 += 64) {                                                                       \
        const int64_t j1 = j0 + 64 < T ? j0 + 64 : T;                                                              \
        int above = 0;                                                                                             \
        if (col_bias)                                                                                              \
            for (int64_t j = j0; j < j1; j++) above += a * (RAW(j)) + col_bias[j] > thr;                           \
        else                                                                                                       \
            for (int64_t j = j0; j < j1; j++) above += a * (RAW(j)) > thr;                                         \
        if (!above) continue;                                                                                      \
        for (int64_t j = j0; j < j1; j++) {                                                                        \
            const float s = a * (RAW(j)) + (col_bias ? col_bias[j] : 0.f);                                         \
            if (s > thr) {                                                                                         \
                insert(bs, bp, keep, s, offset + j);                                                               \
                thr = bs[keep - 1];                                                                                \
            }                                                                                                      \
        }                                                                                                          \
    }

#define RAW_F32(j) sf[j]
#define RAW_BF16(j) from_bf16(sh[j])
#define RAW_I32(j) (float)si[j]

/* Merge the scores of rows offset..offset+T into each query's running best (m, keep): best_s descending (-inf where
 * empty), best_p the row positions. Raw scores (m, T), row stride `sstride`, are of type `stype` (0 float32,
 * 1 bfloat16, 2 int32); the score compared is row_scale[i] * raw + col_bias[j] (either pointer may be NULL: 1, 0).
 * An entry enters only if it beats the current keep-th best (ties keep the earlier row). */
void tvq_topk_merge(const void *scores, int64_t m, int64_t T, int64_t sstride, int stype, const float *row_scale,
                    const float *col_bias, int64_t offset, int64_t keep, float *best_s, int64_t *best_p) {
    for (int64_t i = 0; i < m; i++) {
        float *bs = best_s + i * keep;
        int64_t *bp = best_p + i * keep;
        float thr = bs[keep - 1];
        const float a = row_scale ? row_scale[i] : 1.f;
        const float *sf = (const float *)scores + i * sstride;
        const uint16_t *sh = (const uint16_t *)scores + i * sstride;
        const int32_t *si = (const int32_t *)scores + i * sstride;
        if (stype == 0) {
            MERGE_ROW(RAW_F32)
        } else if (stype == 1) {
            MERGE_ROW(RAW_BF16)
        } else {
            MERGE_ROW(RAW_I32)
        }
    }
}

/* sum_j lut[j][code_j] over one row of b-bit codes (b not dividing 8), unpacked in registers. */
static inline __attribute__((always_inline)) float lut_sum_row(const uint8_t *r, const int B, int dim,
                                                               const float *lut) {
    const int nbytes = (dim * B + 7) / 8, groups = (dim + 7) / 8, ncent = 1 << B;
    const uint64_t mask = (1u << B) - 1;
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}; /* independent chains (float adds: 3-4 cycles) */
    int g = 0;
    for (; g < groups && g * B + 8 <= nbytes; g++) {
        uint64_t w;
        memcpy(&w, r + g * B, 8);
        const float *t = lut + g * 8 * ncent;
        for (int k = 0; k < 8; k++) s[k] += t[k * ncent + ((w >> (k * B)) & mask)];
    }
    for (; g < groups; g++) {
        const int at = g * B, len = nbytes - at < 8 ? nbytes - at : 8;
        const uint64_t w = load_tail(r + at, len);
        for (int k = 0; k < 8 && g * 8 + k < dim; k++) s[k] += lut[(g * 8 + k) * ncent + ((w >> (k * B)) & mask)];
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static float lut_sum(const uint8_t *r, int bits, int dim, const float *lut) {
    switch (bits) {
    case 3: return lut_sum_row(r, 3, dim, lut);
    case 5: return lut_sum_row(r, 5, dim, lut);
    case 6: return lut_sum_row(r, 6, dim, lut);
    default: return lut_sum_row(r, 7, dim, lut);
    }
}

/* One query against n rows, through lookup tables instead of decoding: out[i] = sum_g scales[g][r] *
 * sum_j lut_g[j][code_gij]. Groups of 1, 2, 4 or 8 bits use one table per code *byte* (256 entries:
 * the sum over the byte's 8/b codes), the others one per code (2^b entries) after unpacking. For a few queries this
 * reads each code once and does one lookup per byte, where decoding writes and re-reads every value. */
void tvq_lut_scan(int ngroups, const uint8_t *const *codes, const int64_t *strides, const int *bits, const int *dims,
                  const float *const *scales, const float *const *luts, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = 0.f;
    for (int g = 0; g < ngroups; g++) {
        const int b = bits[g], d = dims[g];
        const float *lut = luts[g];
        for (int64_t i = 0; i < n; i++) {
            const uint8_t *r = codes[g] + i * strides[g];
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f; /* four chains: float adds have a 3-4 cycle latency */
            int p = 0;
            if (8 % b == 0) {
                const int nb = (d * b + 7) / 8;
                for (; p + 4 <= nb; p += 4) {
                    s0 += lut[p * 256 + r[p]];
                    s1 += lut[(p + 1) * 256 + r[p + 1]];
                    s2 += lut[(p + 2) * 256 + r[p + 2]];
                    s3 += lut[(p + 3) * 256 + r[p + 3]];
                }
                for (; p < nb; p++) s0 += lut[p * 256 + r[p]];
            } else {
                s0 = lut_sum(r, b, d, lut);
            }
            out[i] += scales[g][i] * ((s0 + s1) + (s2 + s3));
        }
    }
}
