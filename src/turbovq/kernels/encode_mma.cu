// Fused encode of K/V rows for 16-bit input, written for the tensor-core operand layouts (mma.sync). Two kernels:
// tq_encode multiplies by the dense rotation R (any rotation; below; with QJL = 1 it also sketches the residual of
// TurboQuant_prod keys, see qjl_sketch), tq_encode_had (HAD = 1, at the end of the file) applies the randomized
// Hadamard rotation in factored form.
//
// Why CUDA and not Triton: the Triton encode keeps a 128-row x D tile of float32 in registers (it spills) and
// converts layouts through shared memory between the rotation's dot, the comparisons and the packing reductions
// (18% of its stall samples). Here every lane owns whole slices of the rows it works on, at every stage:
//   rotation  Y (16 rows x 8 columns) = Xn (16 x D) . R (D x 8 columns): D/16 mma.m16n8k16 per column tile, float16
//             operands, float32 accumulation. Lane (g, t4) holds rows g and g + 8. Input coordinates and output
//             columns may be put in any fragment slot as long as R is stored in the same order (a product sums
//             over the input coordinates), so the lane's A fragments are its own contiguous 16-byte loads of x, and
//             its accumulator columns are the output coordinates [t4 D_i/4, +D_i/4) of channel group i: the lane
//             quantizes them and packs whole byte runs of the output row, with no exchange between lanes.
//   R         read from shared memory, pre-arranged on the host in fragment order (per k-step, two conflict-free
//             16-byte loads per lane give the B fragments of four column tiles; shared by the MT row tiles of a warp).
//   precision x is centered, scaled and divided by its norm in float32 before the float16 conversion (so
//             |xn| <= 1: no overflow, 2^-11 relative rounding, as fine as one-pass tf32 and 8x finer than the
//             bfloat16 input's own rounding); R has the same rounding. Codes then differ from the float32 reference
//             only where a coordinate lies within ~1e-3 of a boundary, by one level. Two channel groups: the
//             product uses the row norm; a group's norm is that of its rotated outputs (R is orthogonal per group),
//             summed in float32 from the accumulators, times the row norm, and the group's outputs are divided by
//             it in float16 (one more rounding). Its relative error from the float16 operands, at most ~3e-4 (5e-4
//             for 32-channel groups), is about the float16 rounding of the cache's stored norms; summing over the
//             input channels instead took a bit mask and two predicated FMAs per coordinate (57% of copy bandwidth
//             at 3.5 bits vs 64% now, kernels_encode_ab_r8.json).
//   quantize  the Lloyd-Max codebooks are symmetric: code = M + 1 + c for y > 0, c otherwise (sign-magnitude labels,
//             cache.sign_magnitude), where c counts the 2^(b-1) - 1 positive boundaries below |y|; two coordinates
//             per float16-pair comparison (see quantize2). The boundaries, rounded to float16, are kernel parameters
//             (constant-bank operands).
//
// One block of NWARPS warps per chunk of rows (tq_encode: of all B H T rows, one block per slot of the card; HAD: of
// one (batch row b, KV head h)); each warp loops over tiles of 16 MT rows.
//
// Configuration macros (set by encode.py): D (head_dim 64/128/256); per channel group i (fractional widths have
// two, outliers first): B_i (bits 2..4), D_i (channels, D1 = 0 for one group); XT (0 float16, 1 bfloat16);
// HAS_MEAN, HAS_SCALE; tuning: NWARPS, MT (16-row tiles per warp), MINB (blocks per SM the registers must allow),
// PF (prefetch the next tile's rows into registers), ASYNC (prefetch them into shared memory instead, cp.async: no
// registers, where they are full; ASYNC staging buffers per warp, 1 or 2), WG (wgmma instead of mma.sync, sm_90a).

typedef unsigned int u32;
typedef unsigned short u16;

struct Params {
    const void* x;       // (B, H, T, D) rows, last dimension contiguous, 16-byte aligned rows
    const float* mean;   // (B H, D) float32, or null
    const float* iscale; // (B H, D) float32 1 / scale, or null
    const u32* rfrag;    // (H or 1, D/32, D/16 k-steps, 2, 32 lanes, 2 tiles, 2) float16 pairs: R in fragment order
    unsigned char* c0;   // codes of group 0 / 1: (B H, T, D_i B_i / 8) bytes
    float* n0;           // norms of group 0 / 1: (B H, T)
    unsigned char* c1;
    float* n1;
    long long sxb, sxh, sxt, rstride;  // x strides (elements); rfrag words per head (0: one R for all heads)
    int T, H, chunk;                   // rows per (b, h), heads, rows per block
    u32 tp0[8], tp1[8];                // positive boundaries of groups 0 / 1 as float16 pairs (2^(B_i-1) - 1 used)
    const int* perm;                   // HAD with HAS_PERM: (H, D) input channel of each permuted position
    const u32* qfrag;                  // QJL: Q = R^T S^T in fragment order (H or 1, RQ/32, D/16, 2, 32, 2, 2)
    unsigned char* qjl;                // QJL: signs (B H, T, RQ / 8) bytes
    float* rn;                         // QJL: residual norms (B H, T)
    long long qstride;                 // QJL: qfrag words per head (0: one Q for all heads)
    u32 tc[8];                         // QJL: the centroids' float16 magnitudes by level as byte tables (residual2)
    int nbh;                           // tq_encode: B H
};

#ifndef QJL  // TurboQuant_prod keys: the QJL sketch of the residual (RQ sketch rows) in the same pass
#define QJL 0
#define RQ 32
#endif

#ifndef ASYNC
#define ASYNC 0
#endif
#ifndef WG_LBO  // the wgmma descriptor's strides between core matrices: along K (leading), along N (stride)
#define WG_LBO 128
#define WG_SBO (D * 16)
#endif
#define NK (D / 16)        // k-steps of the rotation
#define NQ (D / 4)         // input coordinates per lane and row
#define NCH (D / 32)       // 16-byte chunks (8 coordinates) per lane and row
#define DG1 (D1 > 0 ? D1 : 16)  // sizes the (unused) group-1 arrays of a one-group codec
#define LB0 (D0 * B0 / 32)      // output bytes per lane and row
#define LB1 (DG1 * B1 / 32)

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#ifndef WG  // wgmma (sm_90a): the B operands (R, Q) read by the tensor cores from shared memory (below)
#define WG 0
#endif
#ifndef WGA  // WG: every column block's product issued at once (up to 4 in flight, one accumulator set each)
#define WGA 0
#endif
#if WG
#if MT != 1 || NWARPS % 4
#error "WG takes one row tile per warp and whole warpgroups"
#endif
// WG = 1: a warpgroup (4 warps, 64 rows: warp w's row tile is rows 16 (w % 4) ..) multiplies by R and Q with wgmma,
// A from the registers (the same fragments as mma.sync's), B from shared memory in the no-swizzle K-major core-matrix
// layout (encode.wgmma_order): element (k, n) at byte 16 D (n / 8) + 128 (k / 8) + 16 (n % 8) + 2 (k % 8), so a
// k-step's B starts 256 bytes further and a column tile's D * 16 bytes further. One B read serves the 4 warps (mma.sync
// reads it once per warp) and wgmma issues at the tensor cores' full rate. Accumulators: those of mma.sync's column
// tiles, in order. WGA = 1 (one group): all column blocks' products of R (then of Q, up to RQ 128) are issued at once,
// each into its own accumulators, and each block waits only for its own (no accumulator register is rewritten while in
// flight: a version that reused two sets lost half the residual's adds in its SASS and gave wrong QJL signs).
__device__ __forceinline__ unsigned long long wg_desc(const void* smem) {
    const unsigned long long a = (u32)__cvta_generic_to_shared(smem);
    return ((a & 0x3FFFFull) >> 4) | ((unsigned long long)(WG_LBO >> 4) << 16) | ((unsigned long long)(WG_SBO >> 4) << 32);
}

// Issue c[t][0..3] (column tiles t0 .. t0 + 3 of the B region at sb) = A . B over the NK k-steps (m64n32k16) as one
// wgmma group; wg_wait(n, c) waits until at most n (0..3) groups are in flight and hands c back.
__device__ __forceinline__ void wg_issue(float (&c)[4][4], const u32 (&a)[NK][4], const unsigned char* sb, int t0) {
    const unsigned long long d0 = wg_desc(sb);  // (offsets are added to the address field: no carry out of it)
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < NK; s++) {
        const unsigned long long desc = d0 + (unsigned long long)((t0 * (D * 16) + s * 256) >> 4);
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "
            "%12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
            : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3]), "+f"(c[1][0]), "+f"(c[1][1]), "+f"(c[1][2]),
              "+f"(c[1][3]), "+f"(c[2][0]), "+f"(c[2][1]), "+f"(c[2][2]), "+f"(c[2][3]), "+f"(c[3][0]), "+f"(c[3][1]),
              "+f"(c[3][2]), "+f"(c[3][3])
            : "r"(a[s][0]), "r"(a[s][1]), "r"(a[s][2]), "r"(a[s][3]), "l"(desc), "r"((int)(s > 0))
            : "memory");
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void wg_wait(int n, float (&c)[4][4]) {
    switch (n) {  // (n is a constant once the callers' loops are unrolled)
        case 0: asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); break;
        case 1: asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); break;
        case 2: asm volatile("wgmma.wait_group.sync.aligned 2;" ::: "memory"); break;
        default: asm volatile("wgmma.wait_group.sync.aligned 3;" ::: "memory"); break;
    }
#pragma unroll
    for (int t = 0; t < 4; t++)  // (the accumulators are read after the wait)
        asm volatile("" : "+f"(c[t][0]), "+f"(c[t][1]), "+f"(c[t][2]), "+f"(c[t][3])::"memory");
}

__device__ __forceinline__ void wg_product(float (&c)[4][4], const u32 (&a)[NK][4], const unsigned char* sb, int t0) {
    wg_issue(c, a, sb, t0);
    wg_wait(0, c);
}
#endif

// One 16 x 8 x 16 product with float16 accumulation: its accumulator pairs are directly the next step's operands.
__device__ __forceinline__ void mma16816h(u32 (&c)[2], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%8,%8};"
        : "=r"(c[0]), "=r"(c[1])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0u));
}

// The low (hi = 0) or high 16-bit float of a word, as float32.
__device__ __forceinline__ float elem_f(u32 w, int hi) {
#if XT == 1
    return __uint_as_float(hi ? w & 0xFFFF0000u : w << 16);
#else
    float f;
    const u16 hv = (u16)(hi ? w >> 16 : w);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(hv));
    return f;
#endif
}

// Coordinate j (0..7) of a 16-byte chunk of 16-bit floats, as float32.
__device__ __forceinline__ float chunk_f(const uint4& v, int j) {
    return elem_f(j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w, j & 1);
}

// Lane coordinate q (0 .. D/4) of a row is x[32 (q / 8) + 8 t4 + q % 8] (16-byte chunk q / 8); centered and scaled:
// (x - mean) / scale as one multiply-add, x si + sm with sm = -mean / scale (the block's setup), as the HAD kernel.
// (Every index below is a compile-time constant once the loops are unrolled: the arrays stay in registers.)
__device__ __forceinline__ float coord(const uint4 (&raw)[NCH], int q, const float* sm, const float* si, int t4) {
    float v = chunk_f(raw[q / 8], q % 8);
    const int col = 32 * (q / 8) + 8 * t4 + q % 8;
#if HAS_MEAN && HAS_SCALE
    v = fmaf(v, si[col], sm[col]);
#elif HAS_MEAN
    v -= sm[col];
#elif HAS_SCALE
    v *= si[col];
#endif
    (void)col;
    return v;
}

// 1 / sqrt(ss) for a sum of squares, 0 for 0 (a zero row or group); ss * rsqrt_nz(ss) is its norm to ~2e-7
// relative (the multi-function unit's reciprocal square root: no IEEE square root and division slow paths).
__device__ __forceinline__ float rsqrt_nz(float ss) { return ss > 0.f ? rsqrtf(fmaxf(ss, 1e-36f)) : 0.f; }

// The same without the denormal range fix-up around MUFU.RSQ (the argument is clamped to a normal float).
__device__ __forceinline__ float rsqrt_nz_ftz(float ss) {
    float r;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(fmaxf(ss, 1e-36f)));
    return ss > 0.f ? r : 0.f;
}

// Per 16-bit half: 0xFFFF where a > b (float16 pairs), else 0.
__device__ __forceinline__ u32 hgt2(u32 a, u32 b) {
    u32 r;
    asm("set.gt.u32.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// Codes of two normalized coordinates (y0, y1), in the low bits of the two 16-bit halves. Symmetric codebook with
// positive boundaries tp (float16 pairs), sign-magnitude labels: the code is c for y <= 0 and 2^(b-1) + c for y > 0,
// where c = #(tp < |y|). Both coordinates at once in float16 pairs: the comparison masks (0xFFFF per half) summed as
// 32-bit integers give S = 0xFFFF (c0 + 2^16 c1), and 0xFFFF * 0x10001 = -1 (mod 2^32), so S * -0x10001 holds c0
// and c1 in its halves (one multiply): levels2h returns that, quantize2h the codes.
template <int BITS>
__device__ __forceinline__ u32 levels2h(u32 y, const u32* tp) {  // y: the pair as float16 pair
    constexpr u32 M = (1u << (BITS - 1)) - 1;
    u32 a;  // |y| (ptxas folds the abs into the comparisons' operands: no instruction)
    asm("abs.f16x2 %0, %1;" : "=r"(a) : "r"(y));
    u32 s = 0;
#pragma unroll
    for (int k = 0; k < (int)M; k++) s += hgt2(a, tp[k]);
    return s * 0xFFFEFFFFu;
}

template <int BITS>
__device__ __forceinline__ u32 codes_of_levels(u32 lv, u32 y) {  // c -> 2^(b-1) + c where y > 0
    return lv | (hgt2(y, 0u) & ((1u << (BITS - 1)) * 0x10001u));
}

template <int BITS>
__device__ __forceinline__ u32 quantize2h(u32 y, const u32* tp) {
    return codes_of_levels<BITS>(levels2h<BITS>(y, tp), y);
}

// __byte_perm without its masking of the selector (PRMT reads only the low 16 bits of it)
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// The rotated residual y - centroid(code) of a float16 pair (TurboQuant_prod keys), from v = levels2h(y): the
// symmetric codebook's centroid is +-|centroid| of level c, negative for y <= 0 as in quantize2h. The float16
// magnitudes, by level, are byte tables (encode._layer_constants): BITS <= 3, tc[0] their low bytes and tc[1] their
// high bytes, so that one byte permute with selector nibbles (d0, 4 + d0, d1, 4 + d1) reads both halves' centroids;
// BITS = 4, tc[0..1] the low and tc[2..3] the high bytes of the 8 levels (two permutes and a merge).
template <int BITS>
__device__ __forceinline__ u32 residual2(u32 y, u32 v, const u32* tc) {
    const u32 d = v + (v >> 8);  // the levels d0, d1 in bytes 0 and 1
    u32 cabs;
    if (BITS <= 3) {
        cabs = prmt(tc[0], tc[1], d * 0x11u + 0x4040u);
    } else {
        const u32 sel = d * 0x11u;
        cabs = (prmt(tc[0], tc[1], sel) & 0x00FF00FFu) | (prmt(tc[2], tc[3], sel) & 0xFF00FF00u);
    }
    const u32 cent = cabs | (~hgt2(y, 0u) & 0x80008000u);
    u32 e;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(e) : "r"(y), "r"(cent));
    return e;
}

template <int BITS, bool SCALED>
__device__ __forceinline__ u32 quantize2(float y0, float y1, u32 scale, const u32* tp) {
    u32 y = pack_h2(y0, y1);
    if (SCALED) asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(y) : "r"(scale));
    return quantize2h<BITS>(y, tp);
}

#if !HAD
// Four code pairs (column tiles 4w .. 4w + 3, halves = columns e = 0, 1) -> 8 codes of BITS bits (8 BITS low bits).
// Two byte permutes and a shifted add give the nibbles [p0.e0, p2.e0, p1.e0, p3.e0, p0.e1, p2.e1, p1.e1, p3.e1]:
// the run position of column e of tile 4w + i is 8w + 4e + (0, 2, 1, 3)[i] (fragment_rotation builds R to match).
// Narrower codes are then compacted nibble pairs -> bytes -> halves -> 24 / 16 bits.
template <int BITS>
__device__ __forceinline__ u32 pack8(u32 p0, u32 p1, u32 p2, u32 p3) {
    u32 x = __byte_perm(p0, p1, 0x6240) + (__byte_perm(p2, p3, 0x6240) << 4);
    if (BITS == 3) {
        x = (x & 0x07070707u) | ((x >> 1) & 0x38383838u);
        x = (x & 0x003F003Fu) | ((x >> 2) & 0x0FC00FC0u);
        x = (x & 0x00000FFFu) | ((x >> 4) & 0x00FFF000u);
    } else if (BITS == 2) {
        x = (x & 0x03030303u) | ((x >> 2) & 0x0C0C0C0Cu);
        x = (x & 0x000F000Fu) | ((x >> 4) & 0x00F000F0u);
        x = (x & 0x000000FFu) | ((x >> 8) & 0x0000FF00u);
    }
    return x;
}

// Add an NBITS-bit field at bit position pos of a lane's output run (fields are disjoint: + is |).
template <int NBITS, int NW>
__device__ __forceinline__ void put(u32 (&w)[NW], int pos, u32 v) {
    w[pos / 32] += v << (pos % 32);
    if (pos % 32 + NBITS > 32) w[pos / 32 + 1] += v >> (32 - pos % 32);
}

// Store a lane's NB output bytes at dst with the widest aligned stores the run size allows.
template <int NB, int NW>
__device__ __forceinline__ void store_run(unsigned char* dst, const u32 (&w)[NW]) {
    if (NB % 16 == 0) {
#pragma unroll
        for (int i = 0; i < NB / 16; i++) ((uint4*)dst)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    } else if (NB % 8 == 0) {
#pragma unroll
        for (int i = 0; i < NB / 8; i++) ((uint2*)dst)[i] = make_uint2(w[2 * i], w[2 * i + 1]);
    } else if (NB % 4 == 0) {
#pragma unroll
        for (int i = 0; i < NB / 4; i++) ((u32*)dst)[i] = w[i];
    } else if (NB % 2 == 0) {
#pragma unroll
        for (int i = 0; i < NB / 2; i++) ((u16*)dst)[i] = (u16)(w[i / 2] >> (16 * (i % 2)));
    } else {
#pragma unroll
        for (int i = 0; i < NB; i++) dst[i] = (unsigned char)(w[i / 4] >> (8 * (i % 4)));
    }
}

// Rotate, quantize and pack channel group i (column tiles U0 .. U0 + DI/8) of the warp's MT row tiles and store
// the codes: lane (g, t4) writes bytes [t4 LB, +LB) of rows g and g + 8 of each row tile. Four column tiles at a
// time: their accumulator chains are independent (the mma latency overlaps), their B fragments come in two 16-byte
// shared-memory loads per k-step, and their code pairs make one 8-code word (pack8). With two groups the whole
// group is rotated first: its norm (written to norms) is that of its outputs, which are then divided by it.
// QJL (TurboQuant_prod keys, one group): res receives the rotated residual y - centroid as float16 pairs in the A
// fragment layout of k-step s = tile / 2 (the accumulator pairs of tiles 2 s, 2 s + 1, as flash attention's P V).
template <int BITS, int DI, int U0, int LB>
__device__ __forceinline__ void encode_group(const u32 (&a)[MT][NK][4], const float (&nrm)[MT][2], const uint4* sr,
                                             const u32* tp, unsigned char* codes, float* norms, int r0, int hi,
                                             int lane, u32 (&res)[MT][NK][4], const u32* tc) {
    const int g = lane >> 2, t4 = lane & 3;
    constexpr int NW = (LB + 3) / 4, NU = D1 > 0 ? DI / 32 : 1;  // NU: 4-tile blocks held at once
    u32 w[MT][2][NW] = {};  // the lane's byte runs of rows g, g + 8 of each row tile
#if WG && WGA
    static_assert(NU == 1 && DI / 32 <= 4, "WGA: one group of at most 128 channels");
    float acc[DI / 32 > 0 ? DI / 32 : 1][4][4] = {};  // (DI < 32: the unused group-1 code of a one-group codec)
#pragma unroll
    for (int b = 0; b < DI / 32; b++) wg_issue(acc[b], a[0], (const unsigned char*)sr, 4 * (U0 / 4 + b));
#endif
#pragma unroll
    for (int u0 = 0; u0 < DI / 32; u0 += NU) {
        float c[NU][MT][4][4];
#pragma unroll
        for (int u = 0; u < NU; u++)
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int i = 0; i < 4; i++) c[u][m][i][0] = c[u][m][i][1] = c[u][m][i][2] = c[u][m][i][3] = 0.f;
#if WG && WGA
        wg_wait(DI / 32 - 1 - u0, acc[u0]);
#pragma unroll
        for (int t = 0; t < 4; t++)
#pragma unroll
            for (int q = 0; q < 4; q++) c[0][0][t][q] = acc[u0][t][q];
#elif WG
#pragma unroll
        for (int u = 0; u < NU; u++) wg_product(c[u][0], a[0], (const unsigned char*)sr, 4 * (U0 / 4 + u0 + u));
#else
#pragma unroll
        for (int u = 0; u < NU; u++)
#pragma unroll
            for (int s = 0; s < NK; s++) {
                const int u4 = U0 / 4 + u0 + u;
                const uint4 b01 = sr[((u4 * NK + s) * 2) * 32 + lane];      // tiles 4 u4, 4 u4 + 1
                const uint4 b23 = sr[((u4 * NK + s) * 2 + 1) * 32 + lane];  // tiles 4 u4 + 2, 4 u4 + 3
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    mma16816(c[u][m][0], a[m][s], b01.x, b01.y);
                    mma16816(c[u][m][1], a[m][s], b01.z, b01.w);
                    mma16816(c[u][m][2], a[m][s], b23.x, b23.y);
                    mma16816(c[u][m][3], a[m][s], b23.z, b23.w);
                }
            }
#endif
        u32 f[MT][2] = {};  // two groups: 1 / the group's output norm, a float16 pair, per row tile and row
#pragma unroll
        for (int m = 0; m < (D1 > 0 ? MT : 0); m++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float ss = 0.f;  // the group's outputs of row g + 8 r: this lane's columns, then the row's 4 lanes
#pragma unroll
                for (int u = 0; u < NU; u++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const float y0 = c[u][m][i][2 * r], y1 = c[u][m][i][2 * r + 1];
                        ss = fmaf(y0, y0, fmaf(y1, y1, ss));
                    }
                ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 1);
                ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 2);
                const float inv = rsqrt_nz(ss);
                // (capped at float16's largest: a group under ~2e-10 of the row's energy is float16-subnormal)
                f[m][r] = pack_h2(fminf(inv, 65504.f), fminf(inv, 65504.f));
                const int row = r0 + 16 * m + 8 * r + g;
                if (t4 == 0 && row < hi) norms[row] = ss * inv * nrm[m][r];
            }
#pragma unroll
        for (int u = 0; u < NU; u++)
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    u32 pr[4];  // code pairs of the 4 column tiles (columns 2 t4, 2 t4 + 1 of row g + 8 r)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
#if QJL
                        const u32 y = pack_h2(c[u][m][i][2 * r], c[u][m][i][2 * r + 1]);
                        const int tile = 4 * (u0 + u) + i;
                        const u32 lv = levels2h<BITS>(y, tp);
                        pr[i] = codes_of_levels<BITS>(lv, y);
                        res[m][tile >> 1][2 * (tile & 1) + r] = residual2<BITS>(y, lv, tc);
#else
                        pr[i] = quantize2<BITS, (D1 > 0)>(c[u][m][i][2 * r], c[u][m][i][2 * r + 1], f[m][r], tp);
#endif
                    }
                    put<8 * BITS>(w[m][r], 8 * BITS * (u0 + u), pack8<BITS>(pr[0], pr[1], pr[2], pr[3]));
                }
    }
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int row = r0 + 16 * m + 8 * r + g;
            if (row < hi) store_run<LB>(codes + (long long)row * (4 * LB) + t4 * LB, w[m][r]);
        }
}

#if QJL
// The QJL sketch of the residual rows e (res): signs of e Q (>= 0 -> 1, as QJL.sketch) and ||e|| times the row norm.
// Q's columns are ordered (encode.qjl_fragments) so that lane t4's accumulator columns are its own run of RQ / 4 sign
// bits, pushed in order: push p = 8 v4 + 2 j + e (column tile 4 v4 + j, column 2 t4 + e) lands at bit
// (bits in its word - 1) - p % 32 of word p / 32.
__device__ __forceinline__ void qjl_sketch(const u32 (&e)[MT][NK][4], const float (&nrm)[MT][2], const uint4* sq,
                                           unsigned char* qjl, float* rn, int r0, int hi, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
    constexpr int NB = RQ / 4, NWQ = (NB + 31) / 32;  // sign bits per lane and row, in words
    u32 w[MT][2][NWQ] = {};
#if WG && WGA && RQ <= 128  // (more sketch rows: one column block's product at a time)
    float acc[RQ / 32][4][4] = {};
#pragma unroll
    for (int b = 0; b < RQ / 32; b++) wg_issue(acc[b], e[0], (const unsigned char*)sq, 4 * b);
#endif
#pragma unroll
    for (int v4 = 0; v4 < RQ / 32; v4++) {
        float c[MT][4][4] = {};
#if WG && WGA && RQ <= 128
        wg_wait(RQ / 32 - 1 - v4, acc[v4]);
#pragma unroll
        for (int t = 0; t < 4; t++)
#pragma unroll
            for (int q = 0; q < 4; q++) c[0][t][q] = acc[v4][t][q];
#elif WG
        wg_product(c[0], e[0], (const unsigned char*)sq, 4 * v4);
#else
#pragma unroll
        for (int s = 0; s < NK; s++) {
            const uint4 b01 = sq[((v4 * NK + s) * 2) * 32 + lane];
            const uint4 b23 = sq[((v4 * NK + s) * 2 + 1) * 32 + lane];
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma16816(c[m][0], e[m][s], b01.x, b01.y);
                mma16816(c[m][1], e[m][s], b01.z, b01.w);
                mma16816(c[m][2], e[m][s], b23.x, b23.y);
                mma16816(c[m][3], e[m][s], b23.z, b23.w);
            }
        }
#endif
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int ee = 0; ee < 2; ee++) {
                        const int push = 8 * v4 + 2 * j + ee;  // (the sign bit shifted in: one funnel shift)
                        w[m][r][push / 32] = __funnelshift_l(__float_as_uint(c[m][j][2 * r + ee]), w[m][r][push / 32], 1);
                    }
    }
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int r = 0; r < 2; r++)
#pragma unroll
            for (int i = 0; i < NWQ; i++)  // sign bit 0 (>= 0) -> 1
                w[m][r][i] ^= NB - 32 * i >= 32 ? 0xFFFFFFFFu : (1u << (NB - 32 * i)) - 1;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            u32 acc = 0;  // the lane's squares of e, float16 pairs (|e|^2 ~ 1e-4 .. 1e-2 per pair: no range issue)
#pragma unroll
            for (int s = 0; s < NK; s++)
#pragma unroll
                for (int jj = 0; jj < 2; jj++)
                    asm("fma.rn.f16x2 %0, %1, %1, %0;" : "+r"(acc) : "r"(e[m][s][2 * jj + r]));
            float lo, hi2;
            asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}"
                : "=f"(lo), "=f"(hi2) : "r"(acc));
            float ss = lo + hi2;
            ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 1);
            ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 2);
            const int row = r0 + 16 * m + 8 * r + g;
            if (row < hi) {
                if (t4 == 0) rn[row] = nrm[m][r] * sqrtf(ss);
                store_run<NB / 8>(qjl + (long long)row * (RQ / 8) + t4 * (NB / 8), w[m][r]);
            }
        }
}
#endif

// Rows [lo, hi) of (b, h) = bh: the block loads R (QJL: and Q), the mean and the scales into shared memory, then each
// warp encodes its tiles. A block may take the end of one (b, h) and the start of the next (tq_encode), so it waits
// for every warp to be done with the previous rows' constants before it replaces them.
__device__ __forceinline__ void encode_segment(const Params& p, uint4* smem_v, int bh, int lo, int hi) {
    u32* sr = (u32*)smem_v;                // R fragments: D * D / 2 words (QJL: then Q's, D * RQ / 2 words)
    float* sm = (float*)(sr + D * D / 2 + (QJL ? D * RQ / 2 : 0));  // mean, then 1 / scale (D each)
    float* si = sm + D;
    const int b = bh / p.H, h = bh % p.H;
    __syncthreads();
    {
        const uint4* src = (const uint4*)(p.rfrag + h * p.rstride);
        for (int i = threadIdx.x; i < D * D / 8; i += NWARPS * 32) smem_v[i] = src[i];
#if QJL
        const uint4* qsrc = (const uint4*)(p.qfrag + h * p.qstride);
        for (int i = threadIdx.x; i < D * RQ / 8; i += NWARPS * 32) smem_v[D * D / 8 + i] = qsrc[i];
#endif
        for (int i = threadIdx.x; i < D; i += NWARPS * 32) {
            const float is = HAS_SCALE ? p.iscale[(long long)bh * D + i] : 1.f;
            if (HAS_MEAN) sm[i] = HAS_SCALE ? -p.mean[(long long)bh * D + i] * is : p.mean[(long long)bh * D + i];
            if (HAS_SCALE) si[i] = is;
        }
    }
#if WG
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // (R and Q, written above, are read by wgmma)
#endif
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const u16* xb = (const u16*)p.x + b * p.sxb + h * p.sxh;
    const long long out_row0 = (long long)bh * p.T;
    unsigned char* c0 = p.c0 + out_row0 * (4 * LB0);
    unsigned char* c1 = p.c1 + out_row0 * (4 * LB1);
    float* n0 = p.n0 + out_row0;
    float* n1 = p.n1 + out_row0;

    // the rows of a tile are loaded before any of them is processed (PF: the next tile's too, into registers)
    uint4 raw[MT][2][NCH];
    auto load_tile = [&](int r0) {
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int row = r0 + 16 * m + 8 * r + g;
                const uint4* src = (const uint4*)(xb + (long long)row * p.sxt + 8 * t4);
#pragma unroll
                for (int c = 0; c < NCH; c++) raw[m][r][c] = row < hi ? src[4 * c] : make_uint4(0u, 0u, 0u, 0u);
            }
    };
    const int step = NWARPS * 16 * MT;
#if ASYNC  // ASYNC staging buffers of 16 MT rows per warp after the mean and scale; a lane reads back only what it
           // copied (no barrier), its 16-byte chunk j of tile row q at j ^ 4 (q & 1) (no bank conflicts). One buffer:
           // the next tile is copied in once the lane has read this one (half the shared memory: more warps fit)
    constexpr int SROWS = 16 * MT * D / 8;  // 16-byte chunks per buffer
    uint4* stg = smem_v + D * D / 8 + (QJL ? D * RQ / 8 : 0) + D / 2 + warp * ASYNC * SROWS;
    auto slot = [&](int m, int r, int c) { return (16 * m + 8 * r + g) * (D / 8) + ((t4 + 4 * c) ^ ((g & 1) << 2)); };
    auto issue = [&](int r0, int buf) {
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int row = r0 + 16 * m + 8 * r + g;
                const uint4* src = (const uint4*)(xb + (long long)(row < hi ? row : lo) * p.sxt + 8 * t4);
#pragma unroll
                for (int c = 0; c < NCH; c++) {
                    const u32 dst = (u32)__cvta_generic_to_shared(stg + buf * SROWS + slot(m, r, c));
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                                 :: "r"(dst), "l"(src + 4 * c), "r"(row < hi ? 16 : 0) : "memory");  // (0: zeros)
                }
            }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    int buf = 0;
    issue(lo + warp * 16 * MT, 0);
    auto held = [&](int m, int r, int c) { return stg[buf * SROWS + slot(m, r, c)]; };  // the prefetched tile
#elif PF
    load_tile(lo + warp * 16 * MT);
    auto held = [&](int m, int r, int c) { return raw[m][r][c]; };
#endif
    // (WG: a warpgroup's 4 warps run while any of its rows is left; rows past hi are zeros and not stored)
    for (int r0 = lo + warp * 16 * MT; r0 - (WG ? 16 * (warp & 3) : 0) < hi; r0 += step) {
#if ASYNC == 2
        if (r0 + step < hi)
            issue(r0 + step, buf ^ 1);
        else
            asm volatile("cp.async.commit_group;" ::: "memory");  // (an empty group: the wait below stays one behind)
        asm volatile("cp.async.wait_group 1;" ::: "memory");
#elif ASYNC
        asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
#if ASYNC || PF
        uint4 cur[MT][2][NCH];
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int c = 0; c < NCH; c++) cur[m][r][c] = held(m, r, c);
#if ASYNC == 2
        buf ^= 1;
#elif ASYNC
        if (r0 + step < hi) issue(r0 + step, 0);  // (after the reads above, in the lane's order of shared accesses)
#else
        if (r0 + step < hi) load_tile(r0 + step);
#endif
#else
        load_tile(r0);
        const auto& cur = raw;
#endif
        u32 a[MT][NK][4];
        float nrm[MT][2];  // row norms, per row tile and row
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int row = r0 + 16 * m + 8 * r + g;
                // the row norm: the lane's coordinates, then the 4 lanes of the row
                float v[NQ], ss = 0.f;
#pragma unroll
                for (int q = 0; q < NQ; q++) {
                    v[q] = coord(cur[m][r], q, sm, si, t4);
                    ss = fmaf(v[q], v[q], ss);
                }
                ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 1);
                ss += __shfl_xor_sync(0xFFFFFFFFu, ss, 2);
                const float inv = rsqrt_nz(ss);
                nrm[m][r] = ss * inv;
                if (D1 == 0 && t4 == 0 && row < hi) n0[row] = nrm[m][r];
                // A fragments of k-step s for this row (r = 0: row g, registers 0 and 2; r = 1: row g + 8, 1 and 3):
                // lane coordinates 4s, 4s + 1 (k = 2 t4, +1) and 4s + 2, 4s + 3 (k = 2 t4 + 8, +9), over the row norm
#pragma unroll
                for (int s = 0; s < NK; s++)
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int q = 4 * s + 2 * j;
                        a[m][s][2 * j + r] = pack_h2(v[q] * inv, v[q + 1] * inv);
                    }
            }
#if QJL  // (one channel group)
        u32 res[MT][NK][4];
        encode_group<B0, D0, 0, LB0>(a, nrm, smem_v, p.tp0, c0, n0, r0, hi, lane, res, p.tc);
        qjl_sketch(res, nrm, smem_v + D * D / 8, p.qjl + out_row0 * (RQ / 8), p.rn + out_row0, r0, hi, lane);
#else
        u32 unused[MT][NK][4];
        encode_group<B0, D0, 0, LB0>(a, nrm, smem_v, p.tp0, c0, n0, r0, hi, lane, unused, p.tc);
        if (D1 > 0) encode_group<B1, DG1, D0 / 8, LB1>(a, nrm, smem_v, p.tp1, c1, n1, r0, hi, lane, unused, p.tc);
#endif
    }
#if ASYNC
    asm volatile("cp.async.wait_group 0;" ::: "memory");  // (no copy outlives the segment)
#endif
}

// Block i encodes rows [i chunk, (i + 1) chunk) of all B H T rows in (b, h)-major order: with one block per slot of
// the card (encode._flat_grid), a block whose rows cross from one (b, h) into the next encodes two segments.
extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINB) tq_encode(const __grid_constant__ Params p) {
    extern __shared__ uint4 smem_v[];
    const int end = min((int)(blockIdx.x + 1) * p.chunk, p.nbh * p.T);  // (B H T < 2^31: encode.py checks)
    for (int f = blockIdx.x * p.chunk; f < end;) {
        const int bh = f / p.T, lo = f - bh * p.T, hi = min(p.T, lo + (end - f));
        encode_segment(p, smem_v, bh, lo, hi);
        f += hi - lo;
    }
}
#else

// ---- HAD = 1: the rotation "hadamard" (the default) as small tensor-core products ----------------------------------
//
// Why: the dense kernel above reads all of R (D^2 / 2 words) from shared memory per 16 rows; at D = 256 that is
// 128 KiB (one block per SM) and its reads bound it (44% of copy bandwidth). The randomized Hadamard rotation is
// x -> H (s3 . H (s2 . H (s1 . x))) (H the orthonormal Sylvester matrix of order D, s_k the rotation's random signs),
// and H factors as a Kronecker product: H_256 = H_16 (x) H_16, H_128 = H_8 (x) H_16, H_64 = H_8 (x) H_8. Laid out as
// a 16 x 16 tile Y (one row of 256; rows a, b of 128 stacked; rows [[a, b], [c, d]] of 64), a round is
// Y -> L (s . Y) R with 16 x 16 factors L, R (H_16, or blockdiag(H_8, H_8)). An mma whose B operand is the previous
// accumulator reads it transposed, so a round is two mma steps and no data exchange between lanes: W = L Z^T (L the
// A operand, the tile's float16 pairs as B fragments), then Z' = W R (W's accumulator pairs are its A fragments),
// and Z' is the next round's tile transposed (the factors of a transposed round are swapped for 128). 4 mma per
// round, 12 per tile, every operand in registers, float16 accumulation (its pairs are the next step's operands):
// no shared memory, no conversions. After the third round a movmatrix per 8 x 8 block turns the tile back.
// Precision: float16 at each of the six steps; codes move by one level only within ~1e-3 of a boundary, as above.
// Scale: H_8's entries are +-1/2 (exact in float16, where 1/sqrt(8) is not), so a round grows the tile by sqrt(2)
// per H_8 factor; the boundaries passed in are scaled by that known growth instead.
//
// G2 = 1: fractional widths at D = 256, two channel groups of 128 (outliers first), each with its own rotation,
// norm and codebook: the tile is the layout of two rows of 128, group g in tile rows 8 g .. 8 g + 7; with HAS_PERM
// each group's channels are gathered through the head's permutation (p.perm): the lanes store the rows (as loaded)
// of the warp's TW tiles in shared memory and read back their channels (kv.cache.gather_order orders a calibrated
// group's channels so that these reads are free of bank conflicts).
//
// Lane (g, t4) loads columns 4 t4 .. 4 t4 + 3 of tile rows g and g + 8 (one 8-byte load each) into the B-fragment
// slots 2 t4, 2 t4 + 1, 2 t4 + 8, 2 t4 + 9; the first round's L has its columns permuted to match, and round 0's
// signs are folded into the lane's channel scales. The codes of 8 columns of a tile row (b bytes) are gathered from
// the row's 4 lanes by a reduce-scatter of two shuffles; each lane stores one such run, or (WORDS: 3-bit runs, two
// widths) one aligned 4-byte word of the tile's output, from the runs of two lanes. Configuration macros: D, B0
// (2..4), G2, B1, HAS_PERM, XT, HAS_MEAN, HAS_SCALE; tuning NWARPS, MINB, TW (tiles per warp in flight), ASYNC
// (staging buffers per warp, cp.async; 0: the next tiles prefetched into registers). p.rfrag
// holds the lane constants (encode.hadamard_lane_constants, then encode.store_lane_constants).

#ifndef G2  // one channel group unless told
#define G2 0
#define B1 B0
#define D0 D
#endif
#ifndef HAS_PERM
#define HAS_PERM 0
#endif
#if G2
#define TD 128  // the tile's layout: that of two rows of 128
#else
#define TD D
#endif
#define RPT (256 / D)  // rows per tile
// stores as aligned 4-byte words gathered from the runs (store_lane_constants) where runs alone would diverge: 3-bit
// runs (odd or even byte offsets), or two widths side by side
#define WORDS (G2 || B0 == 3)


__device__ __forceinline__ u32 movtrans(u32 a) {
    u32 d;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
}

// (row of the tile's RPT rows, or group for G2; first coordinate) of tile row rho, columns c .. c + 3 or c .. c + 7.
__device__ __forceinline__ void tile_place(int rho, int c, int& r, int& o) {
#if TD == 256
    r = 0, o = 16 * rho + c;
#elif TD == 128
    r = rho >> 3, o = 16 * (rho & 7) + c;
#else
    r = 2 * (rho >> 3) + (c >> 3), o = 8 * (rho & 7) + (c & 7);
#endif
}

// The codes of a float16 pair (quantize2h) as 2 BITS bits at this lane's place in an 8-code run.
template <int BITS>
__device__ __forceinline__ u32 code_pair(u32 y, const u32* tp, int t4) {
    const u32 q = quantize2h<BITS>(y, tp);
    return ((q | (q >> (16 - BITS))) & ((1u << 2 * BITS) - 1)) << (2 * t4 * BITS);
}

// Store a run of 8 codes (BITS = 4 or 2 bytes) at dst (other widths: WORDS).
template <int BITS>
__device__ __forceinline__ void store_unit(unsigned char* dst, u32 run) {
    if (BITS == 4)
        *(u32*)dst = run;
    else
        *(u16*)dst = (u16)run;
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINB) tq_encode_had(const __grid_constant__ Params p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    // the lane's constants (hadamard_lane_constants): per round the A fragments of L, the B fragments of R's two
    // column tiles and the sign masks of the tile's four registers
    u32 la[3][4], rb[3][2][2], sg[3][4];
#pragma unroll
    for (int k = 0; k < 3; k++) {
        const uint4* src = (const uint4*)p.rfrag + (k * 32 + lane) * 3;
        const uint4 l = src[0], r = src[1], m = src[2];
        la[k][0] = l.x, la[k][1] = l.y, la[k][2] = l.z, la[k][3] = l.w;
        rb[k][0][0] = r.x, rb[k][0][1] = r.y, rb[k][1][0] = r.z, rb[k][1][1] = r.w;
        sg[k][0] = m.x, sg[k][1] = m.y, sg[k][2] = m.z, sg[k][3] = m.w;
    }
#if WORDS  // the word this lane stores: source lanes and shifts, lane b's mask, slot, byte offset (-1: none)
    const uint4 sw = ((const uint4*)p.rfrag)[(3 * 32 + lane) * 3];
    const int wa = sw.x & 31, wb = (sw.x >> 8) & 31, wsa = (sw.x >> 16) & 31, wsb = sw.x >> 24;
    const u32 wmask = sw.y;
    const int wslot = sw.z, woff = (int)sw.w;
#endif
    // this lane's input: coordinates o[nu] .. o[nu] + 3 of row (G2: group) r[nu] of each tile (tile row g + 8 nu),
    // input channels ch[nu][i]
    int r[2], o[2], lin[2], ch[2][4];  // lin: the first of the 4 row positions the lane loads
    float mn[2][4], sc[2][4];
#pragma unroll
    for (int nu = 0; nu < 2; nu++) {
        tile_place(g + 8 * nu, 4 * t4, r[nu], o[nu]);
        lin[nu] = G2 ? 128 * r[nu] + o[nu] : o[nu];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            ch[nu][i] = HAS_PERM ? p.perm[h * D + lin[nu] + i] : lin[nu] + i;
            // (x - m) s = x s - m s; round 0's sign of the element is folded in here (it leaves the norm alone)
            const bool neg = (sg[0][2 * nu + (i >> 1)] >> (15 + 16 * (i & 1))) & 1;
            sc[nu][i] = (HAS_SCALE ? p.iscale[(long long)bh * D + ch[nu][i]] : 1.f) * (neg ? -1.f : 1.f);
            mn[nu][i] = HAS_MEAN ? p.mean[(long long)bh * D + ch[nu][i]] * sc[nu][i] : 0.f;
        }
        if (G2) r[nu] = 0;  // (the tile is one row)
    }
    const int lo = blockIdx.x * p.chunk, hi = min(p.T, lo + p.chunk);
    const int first = lo + warp * RPT * TW, step = NWARPS * RPT * TW;  // the warp's first row, rows per iteration
    // pointers at the warp's first tile, advanced by step rows per iteration
    const u16* xp[2];
#pragma unroll
    for (int nu = 0; nu < 2; nu++)
        xp[nu] = (const u16*)p.x + b * p.sxb + h * p.sxh + (long long)(first + r[nu]) * p.sxt + lin[nu];
    // where this lane's codes go: WORDS, its word (in row wrow of the tile, or group wslot); else the run it holds
    // after the reduce-scatter, tile row g + 8 (t4 & 1), columns 8 (t4 >> 1) ..
#if WORDS
    const int crb = G2 && wslot ? (D - D0) * B1 / 8 : D0 * B0 / 8, wrow = G2 ? 0 : wslot;  // code bytes per row
    unsigned char* cp = (G2 && wslot ? p.c1 : p.c0) + ((long long)bh * p.T + first + wrow) * crb + max(woff, 0);
#else
    int ur, uo;
    tile_place(g + 8 * (t4 & 1), 8 * (t4 >> 1), ur, uo);
    const int crb = D * B0 / 8;
    unsigned char* cp = p.c0 + ((long long)bh * p.T + first + ur) * crb + (uo / 8) * B0;
#endif
    float* np0 = p.n0 + (long long)bh * p.T + first;
    // (TD = 128) lanes 0 and 16 store the norms of tile rows (groups) 0 and 1: nrow, its row in the tile
    const int nrow = G2 ? 0 : lane >> 4;
    float* npl = (G2 && (lane & 16) ? p.n1 : p.n0) + (long long)bh * p.T + first + nrow;
    const long long xstep = (long long)step * p.sxt;

#if ASYNC == 1
#error "the HAD kernel's ASYNC is the number of staging buffers: 2 or more"
#elif ASYNC  // the warp's tiles staged in shared memory by cp.async, ASYNC - 1 iterations ahead (no registers held):
           // lane l copies 16-byte chunk l of each tile (row l / (D / 8) of the tile's RPT rows), the tile as in memory
    __shared__ uint4 stage[NWARPS][ASYNC][TW][32];
    const int lrow = lane / (D / 8);  // the lane's row in a tile
    const u16* const xbh = (const u16*)p.x + b * p.sxb + h * p.sxh + 8 * (lane % (D / 8));
    const u16* src = xbh + (long long)(first + lrow) * p.sxt;  // the lane's chunk of the next tile to copy
    auto issue = [&](int r0, int buf) {  // (r0: the rows src is at)
#pragma unroll
        for (int t = 0; t < TW; t++) {
            const bool in = r0 + RPT * t + lrow < hi;
            const u32 dst = (u32)__cvta_generic_to_shared(&stage[warp][buf][t][lane]);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                         :: "r"(dst), "l"(in ? src + RPT * t * p.sxt : xbh), "r"(in ? 16 : 0) : "memory");  // (0: zeros)
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        src += xstep;
    };
#pragma unroll
    for (int i = 0; i < ASYNC - 1; i++) issue(first + i * step, i);
    int buf = 0;
#else
    auto load = [&](uint2 (&w)[TW][2], int r0) {
#pragma unroll
        for (int t = 0; t < TW; t++)
#pragma unroll
            for (int nu = 0; nu < 2; nu++)
                w[t][nu] = r0 + RPT * t + r[nu] < hi ? *(const uint2*)(xp[nu] + RPT * t * p.sxt) : make_uint2(0u, 0u);
    };
#if HAS_PERM  // (G2: one row per tile) the row passes through the warp's shared memory to gather its channels
    __shared__ uint2 stage[NWARPS][TW][64];
#endif
    uint2 raw[TW][2];
    load(raw, first);
#endif
    for (int r0 = first; r0 < hi; r0 += step, cp += (long long)step * crb, np0 += step, npl += step) {
        uint2 cur[TW][2];
#if ASYNC  // this iteration's copies (every lane's) are in; the buffer read last iteration is refilled
        asm volatile("cp.async.wait_group %0;" :: "n"(ASYNC - 2) : "memory");
        __syncwarp();
        issue(r0 + (ASYNC - 1) * step, (buf + ASYNC - 1) % ASYNC);
#pragma unroll
        for (int t = 0; t < TW; t++) {
            const u16* row = (const u16*)stage[warp][buf][t];
#pragma unroll
            for (int nu = 0; nu < 2; nu++) {
#if HAS_PERM
                cur[t][nu] = make_uint2(row[ch[nu][0]] | (u32)row[ch[nu][1]] << 16, row[ch[nu][2]] | (u32)row[ch[nu][3]] << 16);
#else
                cur[t][nu] = *(const uint2*)(row + r[nu] * D + lin[nu]);
#endif
            }
        }
        buf = (buf + 1) % ASYNC;
#else
#pragma unroll
        for (int t = 0; t < TW; t++) cur[t][0] = raw[t][0], cur[t][1] = raw[t][1];
        xp[0] += xstep, xp[1] += xstep;
        if (r0 + step < hi) load(raw, r0 + step);
#endif
#if HAS_PERM && !ASYNC  // every tile's channels at once: no barrier between the tiles' work, which the compiler interleaves
        __syncwarp();  // (the previous iteration's reads are done)
#pragma unroll
        for (int t = 0; t < TW; t++) stage[warp][t][lin[0] / 4] = cur[t][0], stage[warp][t][lin[1] / 4] = cur[t][1];
        __syncwarp();
#pragma unroll
        for (int t = 0; t < TW; t++) {
            const u16* row = (const u16*)stage[warp][t];
#pragma unroll
            for (int nu = 0; nu < 2; nu++)
                cur[t][nu] = make_uint2(row[ch[nu][0]] | (u32)row[ch[nu][1]] << 16, row[ch[nu][2]] | (u32)row[ch[nu][3]] << 16);
        }
#endif
#pragma unroll
        for (int t = 0; t < TW; t++) {
            const int rt = r0 + RPT * t;  // the tile's first row
            float v[2][4], ss[2];
#pragma unroll
            for (int nu = 0; nu < 2; nu++) {
                ss[nu] = 0.f;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u32 w = i < 2 ? cur[t][nu].x : cur[t][nu].y;
                    v[nu][i] = fmaf(elem_f(w, i & 1), sc[nu][i], -mn[nu][i]);
                    ss[nu] = fmaf(v[nu][i], v[nu][i], ss[nu]);
                }
            }
            // sums of squares: TD = 256 all 32 lanes hold one row; 128 row (group) nu is tile rows 8 nu ..; 64 row
            // 2 nu + t4 / 2 is the lanes with that t4 / 2
#if TD == 256
            ss[0] += ss[1];
#pragma unroll
            for (int m = 1; m < 32; m *= 2) ss[0] += __shfl_xor_sync(0xFFFFFFFFu, ss[0], m);
            ss[1] = ss[0];
#elif TD == 128  // a reduce-scatter: lanes 0-15 sum row (group) 0, lanes 16-31 row 1 (6 shuffles, one rsqrt)
            {
                const bool up = lane & 16;
                float s = (up ? ss[1] : ss[0]) + __shfl_xor_sync(0xFFFFFFFFu, up ? ss[0] : ss[1], 16);
#pragma unroll
                for (int m = 1; m < 16; m *= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, m);
                ss[0] = ss[1] = s;
            }
#else
#pragma unroll
            for (int nu = 0; nu < 2; nu++)
#pragma unroll
                for (int m = 1; m < 32; m *= 2)
                    if (m != 2) ss[nu] += __shfl_xor_sync(0xFFFFFFFFu, ss[nu], m);
#endif
            u32 z[4];  // z[2 nu + e]: float16 pairs of tile row g + 8 nu, slots (columns) 8 e + 2 t4, + 1
            float inv[2];
            inv[0] = rsqrt_nz_ftz(ss[0]);
            inv[1] = TD == 64 ? rsqrt_nz_ftz(ss[1]) : inv[0];
#if TD == 128  // (this lane's sum is its half's row; the other row's from the other half)
            {
                const float own = inv[0], other = __shfl_xor_sync(0xFFFFFFFFu, own, 16);
                inv[0] = lane & 16 ? other : own;
                inv[1] = lane & 16 ? own : other;
                if ((lane & 15) == 0 && rt + nrow < hi) npl[RPT * t] = ss[0] * own;
            }
#endif
#pragma unroll
            for (int nu = 0; nu < 2; nu++) {
                z[2 * nu] = pack_h2(v[nu][0] * inv[nu], v[nu][1] * inv[nu]);
                z[2 * nu + 1] = pack_h2(v[nu][2] * inv[nu], v[nu][3] * inv[nu]);
                const bool mine = TD == 256 ? lane == 0 && nu == 0 : TD == 64 && g == 0 && (t4 & 1) == 0;
                if (mine && rt + r[nu] < hi) np0[RPT * t + r[nu]] = ss[nu] * inv[nu];
            }
#pragma unroll
            for (int k = 0; k < 3; k++) {
                u32 w[4], d[2][2];
#pragma unroll
                for (int nu = 0; nu < 2; nu++)  // W = L Z^T: B fragments of column tile nu are tile row g + 8 nu
                    mma16816h(*(u32(*)[2])(w + 2 * nu), la[k], z[2 * nu] ^ (k ? sg[k][2 * nu] : 0u),
                              z[2 * nu + 1] ^ (k ? sg[k][2 * nu + 1] : 0u));
                const u32 a[4] = {w[0], w[1], w[2], w[3]};  // W's accumulator pairs are its A fragments
#pragma unroll
                for (int e = 0; e < 2; e++) mma16816h(d[e], a, rb[k][e][0], rb[k][e][1]);  // Z' = W R
#pragma unroll
                for (int nu = 0; nu < 2; nu++)
#pragma unroll
                    for (int e = 0; e < 2; e++) z[2 * nu + e] = d[e][nu];
            }
            // the tile is transposed after three rounds: block (e, nu) transposed is block (nu, e); then the codes of
            // each 8-column unit (nu, e), this lane's two at bits 2 t4 b .., reduce-scattered over the row's 4 lanes
            u32 u[4];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                u[e] = code_pair<B0>(movtrans(z[2 * e]), p.tp0, t4);
                u[2 + e] = G2 ? code_pair<B1>(movtrans(z[2 * e + 1]), p.tp1, t4)
                              : code_pair<B0>(movtrans(z[2 * e + 1]), p.tp0, t4);
            }
            const bool o1 = t4 & 1, o2 = t4 & 2;
            u32 k0 = o1 ? u[2] : u[0], k1 = o1 ? u[3] : u[1];
            k0 |= __shfl_xor_sync(0xFFFFFFFFu, o1 ? u[0] : u[2], 1);
            k1 |= __shfl_xor_sync(0xFFFFFFFFu, o1 ? u[1] : u[3], 1);
            u32 run = o2 ? k1 : k0;
            run |= __shfl_xor_sync(0xFFFFFFFFu, o2 ? k0 : k1, 2);
#if WORDS
            const u32 word = (__shfl_sync(0xFFFFFFFFu, run, wa) >> wsa) | (__shfl_sync(0xFFFFFFFFu, run, wb) << wsb & wmask);
            if (woff >= 0 && rt + wrow < hi) *(u32*)(cp + RPT * t * crb) = word;
#else
            if (rt + ur < hi) store_unit<B0>(cp + RPT * t * crb, run);
#endif
        }
    }
#if ASYNC
    asm volatile("cp.async.wait_group 0;" ::: "memory");  // (no copy outlives the block)
#endif
}
#endif
