// Split pass of decode attention on TurboQuant codes, written for the tensor-core operand layouts (mma.sync).
//
// Why CUDA and not Triton: the value product reduces over tokens, so its operand needs (token t, token t + 1) pairs
// in each register, while a decoder naturally makes (coordinate c, c + 1) pairs. Triton chooses the register layout
// of an inline-asm result and converts it through shared memory every tile (most of the Triton kernel's time). Here
// each lane decodes exactly the codes its mma fragments need, and the value codes of two tokens are interleaved
// before the lookups so that these yield token pairs (VPAIR). Coordinates may be assigned to fragment slots in any
// order (a sum over coordinates does not care, and the value accumulator is written back through the same map), so
// every lane reads contiguous code slices.
//
// A 1-D grid (see Params): one program (block of NWARPS warps) per code piece (split) of each (b, h), then one per
// (b, h) tail window (on tensor cores, in the query's dtype); every block triggers the merge's early launch.
// Where the keys use the rotation "hadamard" with one channel group, the query kernel is tq_decode_query, where the
// values do, the merge is tq_decode_merge (both at the end of the file) instead of decode.py's Triton kernels.
// Each warp streams units of UC 16-token chunks of its split (through a shared-memory ring that its lanes fill with
// asynchronous copies, RING; with RING 0 the next unit is prefetched into registers), and keeps its own online
// softmax; the warps merge through shared memory and write (m, l, acc) into the workspace that the merge kernel
// (decode.py's Triton one, or tq_decode_merge) reads (layout in decode.py).
//
// Per 16-token chunk and warp (G <= 8 query heads of one KV head, padded to the mma's N = 8), for each channel
// group i of D_i coordinates (one, or two for fractional widths, each with its own codes, norms and table):
//   scores  S^T (16 tokens x 8 heads) += ||k||_i K_i (16 x D_i) . Qrot_i^T: D_i/16 mma.m16n8k16, A = decoded key
//           tile, B = query. Lane (g, t4) holds tokens g and g + 8 and decodes coordinates [t4 D_i/4, +D_i/4).
//   values  O_i^T (D_i x 8 heads) += V_i^T (D_i x 16 tokens) . (p ||v||_i)^T: D_i/16 mma, A = decoded value tile
//           (token pairs), B = probabilities moved into the B fragment by 4 shuffles. Lane (g, t4) decodes tokens
//           2 t4, 2 t4 + 1, 2 t4 + 8, 2 t4 + 9 at coordinates [g D_i/8, +D_i/8) and owns those accumulator rows.
// Centroids come from byte-permute (PRMT) lookups in tables held in registers: no memory access per code.
// TurboQuant_prod keys (QJL) add a third key "group": the RQ sign bits of the residual's sketch, decoded to +-1 float16
// through the same lookups, against the query's sketch q_qjl = (q s_k) S^T, times sqrt(pi/2) / RQ ||r||.
//
// Configuration macros (set by decode.py): D, G, NWARPS; per side and channel group i (fractional widths have two:
// outliers first) KB_i / VB_i (2, 3 or 4 bits), KD_i / VD_i (channels: 32, 64, 128 or 256; KD1 = VD1 = 0 for one
// group), KSYM_i / VSYM_i (symmetric 4-bit table); KNORM / VNORM / QTYPE / MTYPE (0 float16, 1 bfloat16, 2 float32,
// 3 bool), HAS_MASK, HAS_KMEAN, SOFTCAP; QJL (prod keys), RQ (sketch rows: 32, 64, 128 or 256), QNORM (their
// residual norms' dtype); for tq_decode_query HAS_KSCALE, for tq_decode_merge HAS_VSCALE, HAS_VMEAN;
// tuning: UC (16-token chunks per unit), MINB (blocks per SM the register allocation must allow), RING (unit slots
// per warp in shared memory, 0 = register prefetch), VPAIR (token-pair value decode); A/B switches, on by default:
// LAZYMAX, VU16, PRESCALE, FULLCOPY (round 13), MSLACK (round 16), each where it is defined; DBG (timing experiments
// only, wrong results on purpose: 1 = no decode, 2 = no code loads, 3 = no code copies into the ring, 4 = 3-bit codes
// spread to nibbles by one mask, as a nibble-aligned layout would allow (5 and 6, round 9's sign-magnitude mimics,
// are gone: the cache's codes are sign-magnitude now), 7 = correct results and a per-block timeline in p.trace,
// 8 = 1 and 3, 9 = no wait for the query kernel: its results are read as they stand, which in a replayed graph are
// the last call's; 10 = tq_decode_query returns at once, so ws holds no query: the split pass then times other scores
// than real ones; 11 = tq_decode_merge returns at once; 12 = 10 and 11); TAILS_LAST (the tail blocks' place).

typedef unsigned int u32;
typedef unsigned short u16;

struct Params {
    const float* ws;  // rotated queries (BH, G, D) float32, then <q, mu_k> (BH, G)
    float* part;      // partials: m (PG), l (PG), acc (PG, D); PG = BH * (S + 1) * G
    const u32* kc0;   // key codes of group 0 / 1: (BH, k_alloc, KD_i * KB_i / 32) words
    const void* kn0;  // key norms of group 0 / 1: (BH, k_alloc)
    const u32* kc1;
    const void* kn1;
    const u32* vc0;
    const void* vn0;
    const u32* vc1;
    const void* vn1;
    const void* q;     // the unrotated query (for the tail)
    const void* tk;    // tail keys / values (B, H, t_len, D), query dtype
    const void* tv;
    const void* mask;  // (B, n + t_len) with strides smb, smt
    const u32* kq;     // QJL: sign words (BH, k_alloc, RQ / 32), residual norms (BH, k_alloc), and the query's
    const void* kqn;   // sketch q_qjl (BH, G, RQ) float32
    const float* qq;
    long long k_alloc, v_alloc;
    long long sqb, sqh, stb, sth, stt, smb, smt;
    // Pieces of each (b, h)'s n codes: n_long of long_len tokens, then n_short of short_len (partials 0 .. S - 1, S =
    // n_long + n_short; the tail's is S). The grid is 1-D: every (b, h)'s long pieces, then the short ones, then the BH
    // tails (TAILS_LAST), so the blocks that start last are short and the grid drains quickly.
    int n, t_len, n_long, long_len, n_short, short_len, S, H, BH;
    float scaling, softcap, qjl_scale;  // (qjl_scale: sqrt(pi/2) / RQ)
    u32 ktab[2][8];  // PRMT tables per group: low bytes, then high bytes, of the float16 centroids
    u32 vtab[2][8];
    unsigned long long* trace;  // DBG 7: per block, in ns: start, setup done, first copies issued, query kernel
                                // waited for, first unit in, warp 0's last unit begun, end; then SM | units << 16
    // tq_decode_query (keys rotated by "hadamard" with one channel group, no QJL)
    const float* kscale;  // the keys' channel scales s_k and means mu_k per (b, h): (BH, D) each, or null
    const float* kmean;
    u32 ksg[3][8];        // the key rotation's signs per round (hadamard_words)
    int early;            // whether tq_decode_query lets the split pass start at once (decode.py's early)
};

// Channel groups (outliers + the rest for fractional widths; KD1 = VD1 = 0 for one group). Per group: words per
// row, coordinates per lane (keys: D_i / 4 by t4, values: D_i / 8 by g) and raw words per lane slice (2 and 4
// bits are word-aligned, 2-bit slices of 8 codes and 4-bit slices of 4 are half words, a 2-bit slice of 4 a byte; a
// 3-bit slice of 4, 8 or 16 codes may straddle one more word).
#define RAW(BITS, NC) \
    ((BITS) == 3 ? ((3 * (NC)) % 32 ? 2 : 3 * (NC) / 32) : ((BITS) * (NC) + 31) / 32)
#define KDG1 (KD1 > 0 ? KD1 : 64)  // sizes the (unused) group-1 arrays of a one-group side
#define VDG1 (VD1 > 0 ? VD1 : 64)
#define KROW0 (KD0 * KB0 / 32)
#define KROW1 (KD1 * KB1 / 32)
#define VROW0 (VD0 * VB0 / 32)
#define VROW1 (VD1 * VB1 / 32)
#define KW0 RAW(KB0, KD0 / 4)
#define KW1 RAW(KB1, KDG1 / 4)
#define VW0 RAW(VB0, VD0 / 8)
#define VW1 RAW(VB1, VDG1 / 8)
#ifndef QJL
#define QJL 0
#endif
#ifndef QNORM
#define QNORM 0
#endif
#ifndef RQ
#define RQ 32  // (sizes the unused QJL arrays)
#endif
#ifndef FULLCOPY
#define FULLCOPY 1  // whole units copied without per-chunk tests (copy_rows_full)
#endif
#ifndef LAZYMAX
#define LAZYMAX 1  // the softmax's max reduced across lanes only when a lane's scores pass the running max
#endif
#ifndef MSLACK  // the running max is set this far (log2 units) above the largest score seen, so that later scores
#define MSLACK 4  // rarely pass it (and the rescale runs rarely): probabilities stay <= 2^-MSLACK, exact after the
#endif            // merge; 4 costs float16 P operands 4 bits of range, not of precision (kernels_slack_r16*.json)
#ifndef VU16
#define VU16 1  // 3-bit slices of 16 codes read as three half words (halfw3)
#endif
#ifndef HAS_KSCALE  // (tq_decode_query)
#define HAS_KSCALE 0
#endif
#ifndef HAS_VSCALE  // (tq_decode_merge)
#define HAS_VSCALE 0
#endif
#ifndef HAS_VMEAN
#define HAS_VMEAN 0
#endif
#define QROW (RQ / 32)             // sign words per row
#define QW RAW(1, RQ / 4)          // raw words per lane slice (RQ / 4 signs: a byte, a half word, 1 or 2 words)
#define QNB (QNORM == 2 ? 4 : 2)  // residual norm bytes
#define LOG2E 1.4426950408889634f
#define NEG_BIG -1e30f

__device__ __forceinline__ float h2f(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}

template <int T>
__device__ __forceinline__ float load_f(const void* p, long long i) {
    if (T == 0) return h2f(((const u16*)p)[i]);
    if (T == 1) return __uint_as_float(((u32)((const u16*)p)[i]) << 16);
    if (T == 2) return ((const float*)p)[i];
    return ((const unsigned char*)p)[i] ? 0.0f : -__int_as_float(0x7f800000);  // bool mask: False -> -inf
}

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// PRMT in its sign-replicate use (selector nibble bit 3): __byte_perm's contract only covers bits 0-2, and the
// compiler folds the rest away, so this one is inline PTX.
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// a * M + b as an IMAD (ptxas would make a byte permute of a * 2^16 + b, on the integer pipe).
template <u32 M>
__device__ __forceinline__ u32 mad_fma(u32 a, u32 b) {
    u32 r;
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "n"(M), "r"(b));
    return r;
}

// (a & M) | (b & ~M) as one LOP3 (the compiler splits it in two once it knows which bits of b are zero)
template <u32 M>
__device__ __forceinline__ u32 blend(u32 a, u32 b) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(a), "r"(b), "n"(M));
    return r;
}

// 8 codes of 4 bits (one word) -> 4 half2 (coordinate pairs 01, 23, 45, 67).
// SYM (a symmetric table in sign-magnitude order, c[k] = -c[8 + k], as the cache labels Lloyd-Max codes): t[0..3] =
// low / high bytes of c[8..15]; a code looks up c[8 + (k & 7)] and codes k < 8 set the sign bit (the opaque permutes
// keep the compiler from re-masking idx per half). Otherwise t[0..7] = low / high bytes of c[0..15]: two 8-entry
// lookups per byte, selected by the code's top bit. PRMT's sign-replicate mode spreads each code's top bit to a
// byte mask (0xFF where k >= 8).
template <bool SYM>
__device__ __forceinline__ void dec4(u32 w, const u32 (&t)[8], u32* out) {
    const u32 w4 = w << 4;
    const u32 ma = prmt(w4, w, 0xD9C8), mb = prmt(w4, w, 0xFBEA);
    u32 la, ha, lb, hb;
    if (SYM) {
        const u32 idx = w & 0x77777777u, idh = idx >> 16;
        la = prmt(t[0], t[1], idx), lb = prmt(t[0], t[1], idh);
        ha = prmt(t[2], t[3], idx) | (~ma & 0x80808080u);
        hb = prmt(t[2], t[3], idh) | (~mb & 0x80808080u);
    } else {
        const u32 idx = w & 0x77777777u, idh = idx >> 16;
        la = (__byte_perm(t[2], t[3], idx) & ma) | (__byte_perm(t[0], t[1], idx) & ~ma);
        ha = (__byte_perm(t[6], t[7], idx) & ma) | (__byte_perm(t[4], t[5], idx) & ~ma);
        lb = (__byte_perm(t[2], t[3], idh) & mb) | (__byte_perm(t[0], t[1], idh) & ~mb);
        hb = (__byte_perm(t[6], t[7], idh) & mb) | (__byte_perm(t[4], t[5], idh) & ~mb);
    }
    out[0] = __byte_perm(la, ha, 0x5140);
    out[1] = __byte_perm(la, ha, 0x7362);
    out[2] = __byte_perm(lb, hb, 0x5140);
    out[3] = __byte_perm(lb, hb, 0x7362);
}

// Codes spread to nibbles (y: codes 0-3 in the low half, 4-7 in the high half, each < 8) -> 4 half2 from an
// 8-entry table (t[0..1] low bytes, t[2..3] high bytes). prmt, not __byte_perm: the compiler would re-mask y, whose
// nibbles are < 8 already.
__device__ __forceinline__ void lookup8(u32 y, const u32 (&t)[8], u32* out) {
    const u32 yh = y >> 16;
    const u32 la = prmt(t[0], t[1], y), ha = prmt(t[2], t[3], y);
    const u32 lb = prmt(t[0], t[1], yh), hb = prmt(t[2], t[3], yh);
    out[0] = __byte_perm(la, ha, 0x5140);
    out[1] = __byte_perm(la, ha, 0x7362);
    out[2] = __byte_perm(lb, hb, 0x5140);
    out[3] = __byte_perm(lb, hb, 0x7362);
}

// The first two steps of spread3: codes 2k, 2k + 1 of u in bits 8k .. 8k + 5 (the other bits are junk).
__device__ __forceinline__ u32 spread3_pairs(u32 u) {
    const u32 y = blend<0xFFFu>(u, u << 4);
    return blend<0x3F003Fu>(y, y << 2);
}

// 8 codes of 3 bits (low 24 bits of u; the others are ignored) -> the codes in nibbles 0-7. The first two steps keep
// bits that the next step's masks drop (one logic op each instead of two; checked over every input in the CPU
// tests); the last must clear each nibble's top bit (PRMT's sign-replicate flag).
__device__ __forceinline__ u32 spread3(u32 u) {
#if DBG == 4
    return u & 0x77777777u;
#endif
    const u32 y = spread3_pairs(u);
    return (y & 0x07070707u) | ((y << 1) & 0x70707070u);
}

// 8 codes of 3 bits (low 24 bits of u) -> 4 half2: spread the codes to nibbles, then 8-entry lookups.
__device__ __forceinline__ void dec3(u32 u, const u32 (&t)[8], u32* out) { lookup8(spread3(u), t, out); }

// 8 codes of 2 bits (bytes 2 hb and 2 hb + 1 of w) -> 4 half2: spread to nibbles (the table's entries 4-7 unused).
__device__ __forceinline__ void dec2(u32 w, int hb, const u32 (&t)[8], u32* out) {
    u32 y = __byte_perm(w, 0u, 0x4140 + 0x202 * hb);  // the two bytes -> bytes 0 and 2
    y = (y & 0x000F000Fu) | ((y << 4) & 0x0F000F00u);
    y = (y & 0x03030303u) | ((y << 2) & 0x30303030u);
    lookup8(y, t, out);
}

// 8 sign bits (the low byte of b) -> 4 half2 (+-1 from the table's entries 0 and 1): each bit to its own nibble.
__device__ __forceinline__ void dec1(u32 b, const u32 (&t)[8], u32* out) {
    u32 y = (b & 0xFu) | ((b & 0xF0u) << 12);  // bits 0-3 at 0-3, 4-7 at 16-19
    y = (y | (y << 6)) & 0x03030303u;
    lookup8((y | (y << 3)) & 0x11111111u, t, out);
}

// A 3-bit slice of 16 codes (48 bits) starts at a 16-bit boundary and straddles a word: read as three half words and
// put together with multiply-adds (FMA pipe), its two 8-code blocks need no funnel shifts (integer pipe) at decode.
template <int BITS, int NC>
__device__ __forceinline__ constexpr bool halfw3() { return VU16 && BITS == 3 && NC == 16; }

// Raw words of the NC codes starting at code c0 of a row (bit stream, LSB first); sh = the first code's bit in w[0].
// Loads are issued here and only consumed in decode_slice, so a unit's loads stay in flight while another decodes.
template <int BITS, int NC, int NW>
__device__ __forceinline__ void load_slice(const u32* row, int c0, u32 (&w)[NW]) {
#if DBG == 2
#pragma unroll
    for (int i = 0; i < NW; i++) w[i] = (u32)(size_t)row * 0x9E3779B9u + i * 0x85EBCA6Bu + c0;
    return;
#endif
    const u32* p = row + ((BITS * c0) >> 5);
    constexpr int BYTES = BITS * NC / 8;  // 2 and 4 bits: slices are aligned to their size (c0 a multiple of NC)
    if (BITS != 3 && BYTES % 16 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 16; i++) {
            uint4 v = ((const uint4*)p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else if (BITS != 3 && BYTES % 8 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 8; i++) {
            uint2 v = ((const uint2*)p)[i];
            w[2 * i] = v.x, w[2 * i + 1] = v.y;
        }
    } else if (BITS != 3 || (3 * NC) % 32 == 0) {  // includes a 2-bit half word (its half chosen at decode)
#pragma unroll
        for (int i = 0; i < NW; i++) w[i] = p[i];
    } else if (halfw3<BITS, NC>()) {  // its two 8-code blocks' 24 bits, each in a word of its own
        const u16* h = (const u16*)row + ((3 * c0) >> 4);
        const u32 h0 = h[0], h1 = h[1], h2 = h[2];
        w[0] = mad_fma<0x10000u>(h1, h0);
        w[NW - 1] = mad_fma<0x100u>(h2, h1 >> 8);
    } else {  // 3-bit slice of 4, 8 or 16 codes: the second word only where the slice reaches into it
        const int sh = (3 * c0) & 31;
        w[0] = p[0];
        w[1] = sh + 3 * NC > 32 ? p[1] : 0u;
    }
}

// Raw words (first code at bit sh) -> NC / 2 half2 coordinate pairs.
template <int BITS, int NC, int NW, bool SYM>
__device__ __forceinline__ void decode_slice(const u32 (&raw)[NW], int sh, const u32 (&t)[8], u32* out) {
#if DBG == 1 || DBG == 8
#pragma unroll
    for (int j = 0; j < NC / 2; j++) out[j] = (raw[j % NW] & 0x3BFF3BFFu) ^ (j << 4);
    return;
#endif
    if (BITS == 1) {  // QJL signs (8, 16, 32 or 64 per slice): 8 at a time (slices under a word start at bit sh)
#pragma unroll
        for (int j = 0; j < NC / 8; j++)
            dec1((NC == 8 || NC == 16 ? raw[0] >> sh : raw[j / 4]) >> (8 * (j % 4)), t, out + 4 * j);
    } else if (NC == 4) {  // a value slice of a 32-channel group: decode 8 codes from the slice's first bit, keep 4
        u32 tmp[4];
        if (BITS == 4) dec4<SYM>(raw[0] >> sh, t, tmp);
        else if (BITS == 2) dec2(raw[0] >> sh, 0, t, tmp);
        else dec3(__funnelshift_r(raw[0], raw[NW - 1], sh) & 0xFFFu, t, tmp);  // NW = 2: 12 bits may straddle
        out[0] = tmp[0], out[1] = tmp[1];
    } else if (BITS == 4) {
#pragma unroll
        for (int j = 0; j < NC / 8; j++) dec4<SYM>(raw[j], t, out + 4 * j);
    } else if (BITS == 2) {  // sh is 0 or 16 (a slice of 8 codes in the high half of its word)
#pragma unroll
        for (int j = 0; j < NC / 8; j++) dec2(raw[j / 2], NC == 8 ? sh >> 4 : j & 1, t, out + 4 * j);
    } else if (halfw3<BITS, NC>()) {
        dec3(raw[0], t, out), dec3(raw[NW - 1], t, out + 4);
    } else {
        u32 w[NW + 1];
#pragma unroll
        for (int i = 0; i < NW; i++) w[i] = (3 * NC) % 32 ? __funnelshift_r(raw[i], i + 1 < NW ? raw[i + 1] : 0u, sh)
                                                         : raw[i];
        w[NW] = 0u;
#pragma unroll
        for (int j = 0; j < NC / 8; j++) {
            const int b = 24 * j, i = b >> 5, s = b & 31;
            u32 u = s ? __funnelshift_r(w[i], w[i + 1], s) : w[i];
            dec3(u, t, out + 4 * j);  // (bits 24-31 of u are ignored)
        }
    }
}

template <int T>
__device__ __forceinline__ u32 load_raw(const void* p, int i) {  // a norm's bits, converted at use
    return T == 2 ? ((const u32*)p)[i] : (u32)((const u16*)p)[i];
}

template <int T>
__device__ __forceinline__ float raw_f(u32 x) {
    return T == 0 ? h2f((u16)x) : T == 1 ? __uint_as_float(x << 16) : __uint_as_float(x);
}

#define UT (16 * UC)  // tokens per unit (UC 16-token chunks)
#ifndef RING
#define RING 0  // 0: the next unit prefetched into registers; else unit slots per warp in a shared-memory ring
#endif
#ifndef TAILS_LAST
#define TAILS_LAST 1
#endif
#ifndef DBG
#define DBG 0  // timing experiments only: 1 = no decode (raw words used as operands), 2 = no code loads
#endif

struct Unit {  // raw data of one unit for one lane: per chunk, keys of tokens g, g + 8 and values of tokens
               // 2 t4, 2 t4 + 1, 2 t4 + 8, 2 t4 + 9, per group; norms raw (converted at use)
    u32 k0[UC][2][KW0], k1[UC][2][KW1];
    u32 v0[UC][4][VW0], v1[UC][4][VW1];
    u32 kn[UC][2][2], vn[UC][2][2];  // [chunk][token g, g + 8][group]
    u32 kq[UC][2][QW], qn[UC][2];     // QJL: sign slices and residual norms of tokens g, g + 8
};

#define KNB (KNORM == 2 ? 4 : 2)  // norm bytes
#define VNB (VNORM == 2 ? 4 : 2)

// The arrays of one (b, h): its first row of codes and norms (rows below are 32-bit offsets from here).
struct Rows {
    const u32 *k0, *k1, *v0, *v1, *kq;
    const char *kn0, *kn1, *vn0, *vn1, *kqn;
};

__device__ __forceinline__ Rows head_rows(const Params& p, int pid_bh) {
    const long long rk = (long long)pid_bh * p.k_alloc, rv = (long long)pid_bh * p.v_alloc;
    return {p.kc0 + rk * KROW0, p.kc1 + rk * KROW1, p.vc0 + rv * VROW0, p.vc1 + rv * VROW1, p.kq + rk * QROW,
            (const char*)p.kn0 + rk * KNB, (const char*)p.kn1 + rk * KNB, (const char*)p.vn0 + rv * VNB,
            (const char*)p.vn1 + rv * VNB, (const char*)p.kqn + rk * QNB};
}

// Codes and norms of the unit starting at row t0 of r; rows past `last` read that row instead.
__device__ __forceinline__ void load_unit(const Rows& r, Unit& u, int t0, int last, int g, int t4) {
#pragma unroll
    for (int c = 0; c < UC; c++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int t = min(t0 + 16 * c + g + 8 * j, last);
            load_slice<KB0, KD0 / 4, KW0>(r.k0 + t * KROW0, t4 * (KD0 / 4), u.k0[c][j]);
            u.kn[c][j][0] = load_raw<KNORM>(r.kn0, t);
            u.vn[c][j][0] = load_raw<VNORM>(r.vn0, t);
            if (KD1 > 0) {
                load_slice<KB1, KD1 / 4, KW1>(r.k1 + t * KROW1, t4 * (KD1 / 4), u.k1[c][j]);
                u.kn[c][j][1] = load_raw<KNORM>(r.kn1, t);
            }
            if (VD1 > 0) u.vn[c][j][1] = load_raw<VNORM>(r.vn1, t);
            if (QJL) {
                load_slice<1, RQ / 4, QW>(r.kq + t * QROW, t4 * (RQ / 4), u.kq[c][j]);
                u.qn[c][j] = load_raw<QNORM>(r.kqn, t);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int t = min(t0 + 16 * c + 2 * t4 + (j & 1) + 8 * (j >> 1), last);
            load_slice<VB0, VD0 / 8, VW0>(r.v0 + t * VROW0, g * (VD0 / 8), u.v0[c][j]);
            if (VD1 > 0) load_slice<VB1, VD1 / 8, VW1>(r.v1 + t * VROW1, g * (VD1 / 8), u.v1[c][j]);
        }
    }
}

#if RING
// The shared-memory ring (RING = unit slots per warp): every lane of a warp copies its share of the next units (the
// rows of every code and norm array of tokens [t0, t0 + UT)) with 16-byte asynchronous copies (cp.async, one commit
// group per unit), so RING - 1 units stay in flight without holding registers, and each lane then reads its slices
// from shared memory at fixed offsets. A copy starts at the 16-byte boundary at or below its first row and ends at the
// one at or above its last; the rows' offset past that boundary is the same for every unit of a (b, h), as t0 * row
// bytes is a multiple of 16 (slot_rows adds it). (H100, kernels_tune_r8a.json: 2-5% faster than one lane copying
// whole arrays with cp.async.bulk, whose operands the compiler moves to uniform registers through an elect loop per
// copy: ~140 instructions per unit on one lane, against ~75 here on all lanes.)
#define S_KC0 (UT * KROW0 * 4 + 16)  // slot regions: a unit's rows plus the alignment slack
#define S_KC1 (KD1 > 0 ? UT * KROW1 * 4 + 16 : 0)
#define S_VC0 (UT * VROW0 * 4 + 16)
#define S_VC1 (VD1 > 0 ? UT * VROW1 * 4 + 16 : 0)
#define S_KN1 (KD1 > 0 ? UT * KNB + 16 : 0)
#define S_VN1 (VD1 > 0 ? UT * VNB + 16 : 0)
#define O_KC1 S_KC0
#define O_VC0 (O_KC1 + S_KC1)
#define O_VC1 (O_VC0 + S_VC0)
#define O_KN0 (O_VC1 + S_VC1)
#define O_KN1 (O_KN0 + UT * KNB + 16)
#define O_VN0 (O_KN1 + S_KN1)
#define O_VN1 (O_VN0 + UT * VNB + 16)
#define O_KQ (O_VN1 + S_VN1)
#define O_KQN (O_KQ + (QJL ? UT * QROW * 4 + 16 : 0))
#define SLOT (O_KQN + (QJL ? UT * QNB + 16 : 0))
#define RING_BYTES (NWARPS * RING * SLOT)

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Where one array's rows of a (b, h) are copied from: the 16-byte boundary at or below its row 0, and row 0's offset
// past it (the same for every unit, as t0 * row bytes is a multiple of 16).
struct Src {
    const char* p;
    int off;
};

__device__ __forceinline__ Src src_of(const void* row0) {
    return {(const char*)((size_t)row0 & ~(size_t)15), (int)((size_t)row0 & 15)};
}

// Chunks J, J + 1, ... < NJ of one array's copy: lane's chunk lane + 32 J (16 bytes at byte offset 512 J from this
// lane's first) where it is below chunks.
template <int J, int NJ>
__device__ __forceinline__ void copy_chunks(u32 dst, const char* src, int lane, int chunks) {
    if constexpr (J < NJ) {
        if (lane + 32 * J < chunks)  // (always true for chunks = 2^30: no test)
            asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%2], 16;" ::"r"(dst), "l"(src), "n"(512 * J)
                         : "memory");  // fmt: skip
        copy_chunks<J + 1, NJ>(dst, src, lane, chunks);
    }
}

// Rows [t0, t0 + rows) of one array (row bytes RB) -> the slot region at dst, 16 bytes per lane and copy; chunks past
// the rows are not copied (that part of the slot keeps older, finite data).
template <int RB>
__device__ __forceinline__ void copy_rows(u32 dst, Src s, int t0, int rows, int lane) {
    constexpr int NJ = ((UT * RB + 15) / 16 + 32) / 32;  // the most chunks: a unit's bytes + 1 for the offset
    copy_chunks<0, NJ>(dst + 16 * lane, s.p + t0 * RB + 16 * lane, lane, (s.off + rows * RB + 15) >> 4);
}

// Every array of the unit at t0 into the slot at dst (this lane's share of the copies).
struct Srcs {
    Src k0, k1, v0, v1, kn0, kn1, vn0, vn1, kq, kqn;
};

__device__ __forceinline__ Srcs srcs_of(const Rows& r) {
    return {src_of(r.k0),  src_of(r.k1),  src_of(r.v0),  src_of(r.v1), src_of(r.kn0),
            src_of(r.kn1), src_of(r.vn0), src_of(r.vn1), src_of(r.kq), src_of(r.kqn)};
}

// A whole unit's rows (t0 + UT <= n): every lane copies the unit's first UT * RB / 512 chunk rows without a test; the
// rest, the alignment slack included, as copy_rows (H100, round 13: 2-3% fewer us per call than testing every chunk).
template <int RB>
__device__ __forceinline__ void copy_rows_full(u32 dst, Src s, int t0, int lane) {
    constexpr int NJ = ((UT * RB + 15) / 16 + 32) / 32, SURE = UT * RB / 512;
    const char* src;  // s.p + (t0 RB + 16 lane): one 32-bit offset, one 64-bit add
    asm("mad.wide.u32 %0, %1, 1, %2;" : "=l"(src) : "r"((u32)(t0 * RB + 16 * lane)), "l"(s.p));
    copy_chunks<0, SURE>(dst + 16 * lane, src, lane, 1 << 30);
    copy_chunks<SURE, NJ>(dst + 16 * lane, src, lane, (s.off + UT * RB + 15) >> 4);
}

__device__ __forceinline__ void copy_unit(const Srcs& r, u32 dst, int t0, int n, int lane) {
#if DBG == 3 || DBG == 8
    return;
#endif
#if FULLCOPY
    if (t0 + UT <= n) {
        copy_rows_full<KROW0 * 4>(dst, r.k0, t0, lane);
        if (KD1 > 0) copy_rows_full<KROW1 * 4>(dst + O_KC1, r.k1, t0, lane);
        copy_rows_full<VROW0 * 4>(dst + O_VC0, r.v0, t0, lane);
        if (VD1 > 0) copy_rows_full<VROW1 * 4>(dst + O_VC1, r.v1, t0, lane);
        copy_rows_full<KNB>(dst + O_KN0, r.kn0, t0, lane);
        if (KD1 > 0) copy_rows_full<KNB>(dst + O_KN1, r.kn1, t0, lane);
        copy_rows_full<VNB>(dst + O_VN0, r.vn0, t0, lane);
        if (VD1 > 0) copy_rows_full<VNB>(dst + O_VN1, r.vn1, t0, lane);
        if (QJL) copy_rows_full<QROW * 4>(dst + O_KQ, r.kq, t0, lane);
        if (QJL) copy_rows_full<QNB>(dst + O_KQN, r.kqn, t0, lane);
        return;
    }
#endif
    const int rows = min(UT, n - t0);  // never past the last code
    copy_rows<KROW0 * 4>(dst, r.k0, t0, rows, lane);
    if (KD1 > 0) copy_rows<KROW1 * 4>(dst + O_KC1, r.k1, t0, rows, lane);
    copy_rows<VROW0 * 4>(dst + O_VC0, r.v0, t0, rows, lane);
    if (VD1 > 0) copy_rows<VROW1 * 4>(dst + O_VC1, r.v1, t0, rows, lane);
    copy_rows<KNB>(dst + O_KN0, r.kn0, t0, rows, lane);
    if (KD1 > 0) copy_rows<KNB>(dst + O_KN1, r.kn1, t0, rows, lane);
    copy_rows<VNB>(dst + O_VN0, r.vn0, t0, rows, lane);
    if (VD1 > 0) copy_rows<VNB>(dst + O_VN1, r.vn1, t0, rows, lane);
    if (QJL) copy_rows<QROW * 4>(dst + O_KQ, r.kq, t0, rows, lane);
    if (QJL) copy_rows<QNB>(dst + O_KQN, r.kqn, t0, rows, lane);
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// A slot's arrays as Rows (the first row of the unit in each), so load_unit reads them like global rows.
__device__ __forceinline__ Rows slot_rows(const char* slot, const Rows& r) {
    const auto at = [slot](int region, const void* a) { return slot + region + (int)((size_t)a & 15); };
    return {(const u32*)at(0, r.k0),     (const u32*)at(O_KC1, r.k1), (const u32*)at(O_VC0, r.v0),
            (const u32*)at(O_VC1, r.v1), (const u32*)at(O_KQ, r.kq),  at(O_KN0, r.kn0),
            at(O_KN1, r.kn1),            at(O_VN0, r.vn0),            at(O_VN1, r.vn1),
            at(O_KQN, r.kqn)};
}
#endif

// Scores of one key group for a chunk: s += K_i (16 tokens x D_i) . Qrot_i^T, A fragments decoded from the codes
// of tokens g (kw0) and g + 8 (kw1), two accumulation chains (half the dependent mma latency).
template <int BITS, int DG, int W, bool SYM>
__device__ __forceinline__ void score_group(float (&s)[4], const u32 (&kw0)[W], const u32 (&kw1)[W], int sh,
                                            const u32 (&tab)[8], const u32 (&qb)[DG / 16][2]) {
    u32 a0[DG / 8], a1[DG / 8];
    decode_slice<BITS, DG / 4, W, SYM>(kw0, sh, tab, a0);
    decode_slice<BITS, DG / 4, W, SYM>(kw1, sh, tab, a1);
    float s2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kt = 0; kt < DG / 16; kt++)
        mma16816(kt & 1 ? s2 : s, a0[2 * kt], a1[2 * kt], a0[2 * kt + 1], a1[2 * kt + 1], qb[kt][0], qb[kt][1]);
#pragma unroll
    for (int i = 0; i < 4; i++) s[i] += s2[i];
}

// Value slices decoded as token pairs (VPAIR; 3- and 4-bit slices of whole 8-code blocks): the codes of two tokens
// are interleaved nibble by nibble before the lookups, so each lookup yields the (token t, token t + 1) pairs of the
// A fragment directly: no byte permute per register after the lookups. Pair block j of a slice gives its coordinates
// 8 j + 0, 2, 4, 6 (the even nibbles), then 8 j + 1, 3, 5, 7; vslot maps a register to its coordinate.
#ifndef VPAIR
#define VPAIR 1
#endif
template <int BITS, int NC>
__device__ __forceinline__ constexpr bool vpair() { return VPAIR && BITS != 2 && NC % 8 == 0; }

template <int BITS, int NC>
__device__ __forceinline__ constexpr int vslot(int i) {
    return vpair<BITS, NC>() ? 8 * (i / 8) + (i % 8 < 4 ? 2 * (i % 8) : 2 * (i % 8) - 7) : i;
}

// The j-th 8 codes of a 3- or 4-bit slice (raw words, first code at bit sh): 4 bits in nibbles 0-7 (as decode_slice
// reads them), 3 bits as spread3_pairs leaves them.
template <int BITS, int NC, int NW>
__device__ __forceinline__ u32 code_block(const u32 (&raw)[NW], int sh, int j) {
    if (BITS == 4) return raw[j];
#if DBG == 4
    return spread3(raw[j]);  // (timing only: the codes as a nibble-aligned layout would give them)
#endif
    if (halfw3<BITS, NC>()) return spread3_pairs(raw[j]);
    const int b = 24 * j, i = b >> 5, s = b & 31;
    u32 w0 = raw[i], w1 = i + 1 < NW ? raw[i + 1] : 0u;
    if ((3 * NC) % 32) w0 = __funnelshift_r(w0, w1, sh), w1 = __funnelshift_r(w1, i + 2 < NW ? raw[i + 2] : 0u, sh);
    return spread3_pairs(s ? __funnelshift_r(w0, w1, s) : w0);
}

// Values of one group for a chunk: acc += V_i^T (D_i x 16 tokens) . (p ||v||_i)^T. Without VPAIR, one byte permute per
// register turns two tokens' coordinate pairs into the token pairs of the A fragment.
template <int BITS, int DG, int W, bool SYM>
__device__ __forceinline__ void value_group(float (&acc)[DG / 16][4], const u32 (&vw)[4][W], int sh,
                                            const u32 (&tab)[8], u32 pb0, u32 pb1) {
    if (vpair<BITS, DG / 8>()) {
        u32 r[2][DG / 8];  // per token pair (2 t4 + {0, 1}, 2 t4 + {8, 9}): one register per coordinate (vslot order)
#if DBG == 1 || DBG == 8
#pragma unroll
        for (int pr = 0; pr < 2; pr++)
#pragma unroll
            for (int j = 0; j < DG / 8; j++) r[pr][j] = (vw[2 * pr][j % W] ^ vw[2 * pr + 1][(j + 1) % W]) & 0x3BFF3BFFu;
#pragma unroll
        for (int mt = 0; mt < DG / 16; mt++)
            mma16816(acc[mt], r[0][2 * mt], r[0][2 * mt + 1], r[1][2 * mt], r[1][2 * mt + 1], pb0, pb1);
        return;
#endif
#pragma unroll
        for (int pr = 0; pr < 2; pr++)
#pragma unroll
            for (int j = 0; j < DG / 64; j++) {
                const u32 ya = code_block<BITS, DG / 8, W>(vw[2 * pr], sh, j);
                const u32 yb = code_block<BITS, DG / 8, W>(vw[2 * pr + 1], sh, j);
                if (BITS == 4 || DBG == 4) {  // codes in nibbles
                    const u32 ze = (ya & 0x0F0F0F0Fu) | ((yb << 4) & 0xF0F0F0F0u);  // even coordinates, tokens a, b
                    const u32 zo = ((ya >> 4) & 0x0F0F0F0Fu) | (yb & 0xF0F0F0F0u);  // odd coordinates
                    if (BITS == 4) dec4<SYM>(ze, tab, r[pr] + 8 * j), dec4<SYM>(zo, tab, r[pr] + 8 * j + 4);
                    else lookup8(ze, tab, r[pr] + 8 * j), lookup8(zo, tab, r[pr] + 8 * j + 4);
                } else {  // the same from spread3_pairs' layout (codes 2k, 2k + 1 at bits 8k, 8k + 3)
                    const u32 ze = (ya & 0x07070707u) | ((yb << 4) & 0x70707070u);
                    const u32 zo = ((ya >> 3) & 0x07070707u) | ((yb << 1) & 0x70707070u);
                    lookup8(ze, tab, r[pr] + 8 * j), lookup8(zo, tab, r[pr] + 8 * j + 4);
                }
            }
#pragma unroll
        for (int mt = 0; mt < DG / 16; mt++)
            mma16816(acc[mt], r[0][2 * mt], r[0][2 * mt + 1], r[1][2 * mt], r[1][2 * mt + 1], pb0, pb1);
        return;
    }
    u32 v[4][DG / 16];
#pragma unroll
    for (int j = 0; j < 4; j++) decode_slice<BITS, DG / 8, W, SYM>(vw[j], sh, tab, v[j]);
#pragma unroll
    for (int mt = 0; mt < DG / 16; mt++)
        mma16816(acc[mt], __byte_perm(v[0][mt], v[1][mt], 0x5410), __byte_perm(v[0][mt], v[1][mt], 0x7632),
                 __byte_perm(v[2][mt], v[3][mt], 0x5410), __byte_perm(v[2][mt], v[3][mt], 0x7632), pb0, pb1);
}

// Two floats as a float16 (QT 0) or bfloat16 (QT 1) pair.
template <int QT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    if (QT == 0) return pack_h2(lo, hi);
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The B fragment of (p * ||v||)^T for one value group: lane (g, t4) needs head g at tokens 2 t4, 2 t4 + 1 (b0) and
// + 8 (b1); pr[i] is (token g + 8 (i >> 1), head 2 t4 + (i & 1)); QT: the pair type (the A operand's).
template <int QT = 0>
__device__ __forceinline__ void prob_fragment(const float (&pr)[4], float vn0, float vn1, int src0, int sel, u32& pb0,
                                              u32& pb1) {
    const u32 x01 = pack2<QT>(pr[0] * vn0, pr[1] * vn0), x23 = pack2<QT>(pr[2] * vn1, pr[3] * vn1);
    const u32 y0 = __shfl_sync(0xffffffffu, x01, src0), y1 = __shfl_sync(0xffffffffu, x01, src0 + 4);
    const u32 y2 = __shfl_sync(0xffffffffu, x23, src0), y3 = __shfl_sync(0xffffffffu, x23, src0 + 4);
    pb0 = __byte_perm(y0, y1, sel);
    pb1 = __byte_perm(y2, y3, sel);
}

// Query B fragments of one key group: lane (g, t4) holds head g at the group's coordinates t4 * D_i / 4 + 4 kt +
// {0, 1} (b0) and {2, 3} (b1).
template <int DG>
__device__ __forceinline__ void query_fragments(u32 (&qb)[DG / 16][2], const float* qr, bool valid, float scale) {
#pragma unroll
    for (int kt = 0; kt < DG / 16; kt++) {
        float4 x = valid ? *(const float4*)(qr + 4 * kt) : make_float4(0.f, 0.f, 0.f, 0.f);
        qb[kt][0] = pack_h2(x.x * scale, x.y * scale);
        qb[kt][1] = pack_h2(x.z * scale, x.w * scale);
    }
}

// ---- The randomized Hadamard rotation ("hadamard": x -> F(s2 F(s1 F(s0 x))), F the orthonormal Sylvester transform,
// s_k a round's signs) of one vector of D spread over a warp: lane l holds coordinates EC l .. EC l + EC - 1. Used
// where the cache uses it with one channel group (tq_decode_query, tq_decode_merge) instead of the dense R of
// decode.py's Triton kernels: no R to read, about 50 instructions per round at D = 128, float32 throughout.
#define EC (D / 32)

// x -> x * s for the signs in words w (hadamard_words: bit c % 32 of word c / 32 set means -1 at coordinate c).
__device__ __forceinline__ void flip_signs(float (&x)[EC], const u32 (&w)[8], int lane) {
#pragma unroll
    for (int i = 0; i < EC; i++) {
        const int c = EC * lane + i;
        x[i] = __uint_as_float(__float_as_uint(x[i]) ^ (((w[c >> 5] >> (c & 31)) & 1u) << 31));
    }
}

// x -> x F sqrt(D) (unnormalized): butterflies over the coordinate bits held in a lane, then over the lane bits.
__device__ __forceinline__ void sylvester(float (&x)[EC], int lane) {
#pragma unroll
    for (int h = 1; h < EC; h *= 2)
#pragma unroll
        for (int i = 0; i < EC; i++)
            if (!(i & h)) {
                const float a = x[i], b = x[i + h];
                x[i] = a + b, x[i + h] = a - b;
            }
#pragma unroll
    for (int m = 1; m < 32; m *= 2) {
        const float sg = lane & m ? -1.f : 1.f;  // the upper coordinate of a pair gets (lower - upper)
#pragma unroll
        for (int i = 0; i < EC; i++) x[i] = fmaf(x[i], sg, __shfl_xor_sync(0xffffffffu, x[i], m));
    }
}

#define HNORM (1.f / ((float)D * sqrtf((float)D)))  // three rounds of 1 / sqrt(D)

// Warp partials -> shared memory (each warp writes its entries through its own coordinate map before the barrier)
// -> one merged (m, l, acc[G][D]) partial in the workspace.
struct Smem {
    float m[NWARPS][8], l[NWARPS][8];
    float acc[NWARPS][G][D];
};

__device__ __forceinline__ void merge_and_store(const Params& p, Smem& sm, int part_idx) {
    __syncthreads();
    const long long PG = (long long)p.BH * (p.S + 1) * G;
    float* mo = p.part + (long long)part_idx * G;
    float* lo = p.part + PG + (long long)part_idx * G;
    float* ao = p.part + 2 * PG + (long long)part_idx * G * D;
    for (int i = threadIdx.x; i < G * D; i += NWARPS * 32) {
        int h = i / D;
        float big = NEG_BIG;
#pragma unroll
        for (int w = 0; w < NWARPS; w++) big = fmaxf(big, sm.m[w][h]);
        float a = 0.f, l = 0.f;
#pragma unroll
        for (int w = 0; w < NWARPS; w++) {
            float f = ex2(sm.m[w][h] - big);
            a += f * sm.acc[w][h][i - h * D];
            l += f * sm.l[w][h];
        }
        ao[i] = a;
        if (i - h * D == 0) mo[h] = big, lo[h] = l;
    }
}

// The code path's queries carry scaling * log2(e) unless soft-capped (read_query), so a score is final after the mask;
// tokens past the piece are set to -inf only in a warp's last unit (step).
#ifndef PRESCALE
#define PRESCALE 1
#endif
#define QSCALED (PRESCALE && !SOFTCAP)

__device__ __forceinline__ float code_score(const Params& p, float x, int b, int pos) {
#if HAS_MASK
    x += load_f<MTYPE>(p.mask, b * p.smb + pos * p.smt) * LOG2E;
#endif
    return x;
}

__device__ __forceinline__ float finish_score(const Params& p, float s, int b, int pos, bool valid) {
    s *= p.scaling;
#if SOFTCAP
    s = p.softcap * tanhf(s / p.softcap);
#endif
#if HAS_MASK
    if (valid) s += load_f<MTYPE>(p.mask, b * p.smb + pos * p.smt);
#endif
    return valid ? s * LOG2E : -__int_as_float(0x7f800000);
}

__device__ void tail_split(const Params& p, Smem& sm, int pid_bh, int b, int h) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int DC = D / 32;  // coordinates per lane: [lane * DC, +DC)
    float q[G][DC], acc[G][DC], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_BIG, l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < DC; j++) {
            q[g][j] = load_f<QTYPE>(p.q, b * p.sqb + (h * G + g) * p.sqh + lane * DC + j);
            acc[g][j] = 0.f;
        }
    }
    const long long base = b * p.stb + h * p.sth + lane * DC;
    for (int t = warp; t < p.t_len; t += NWARPS) {
        float k[DC], v[DC];
#pragma unroll
        for (int j = 0; j < DC; j++) {
            k[j] = load_f<QTYPE>(p.tk, base + t * p.stt + j);
            v[j] = load_f<QTYPE>(p.tv, base + t * p.stt + j);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < DC; j++) s += q[g][j] * k[j];
#pragma unroll
            for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            s = finish_score(p, s, b, p.n + t, true);
            float mn = fmaxf(m[g], s), al = ex2(m[g] - mn), pr = ex2(s - mn);
            l[g] = l[g] * al + pr;
            m[g] = mn;
#pragma unroll
            for (int j = 0; j < DC; j++) acc[g][j] = acc[g][j] * al + pr * v[j];
        }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) sm.m[warp][g] = m[g], sm.l[warp][g] = l[g];
#pragma unroll
        for (int j = 0; j < DC; j++) sm.acc[warp][g][lane * DC + j] = acc[g][j];
    }
    merge_and_store(p, sm, pid_bh * (p.S + 1) + p.S);
}


// A warp's l summed over its tokens (the lanes of one t4), then its (m, l) of heads 2 t4, 2 t4 + 1 -> shared memory.
__device__ __forceinline__ void store_ml(Smem& sm, const float (&m)[2], float (&l)[2], int warp, int g, int t4) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
        l[j] += __shfl_xor_sync(0xffffffffu, l[j], 4);
        l[j] += __shfl_xor_sync(0xffffffffu, l[j], 8);
        l[j] += __shfl_xor_sync(0xffffffffu, l[j], 16);
        if (2 * t4 + j < G && g == 0) sm.m[warp][2 * t4 + j] = m[j], sm.l[warp][2 * t4 + j] = l[j];
    }
}

// The full-precision tail on tensor cores (float16 / bfloat16 queries): each warp takes 16-token chunks; scores
// S^T (16 tokens x 8 heads) = K Q^T with A fragments straight from the tail keys, values O^T += V^T P^T with A
// fragments of token pairs and the probabilities moved into the B fragment as in the code path (H100, B = 8, T = 32k:
// 32 us per tail block before, with one token per warp step and shuffle reductions per head).
template <int QT>
__device__ __forceinline__ void mma_tail(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    if (QT == 1)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        mma16816(c, a0, a1, a2, a3, b0, b1);
}

__device__ __forceinline__ u32 ld2(const u16* p, long long i, long long j) {  // two 16-bit values as one operand
    return (u32)p[i] | ((u32)p[j] << 16);
}

__device__ void tail_mma(const Params& p, Smem& sm, int pid_bh, int b, int h) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const u16* q = (const u16*)p.q + b * p.sqb + (h * G + min(g, G - 1)) * p.sqh;
    const u16* tk = (const u16*)p.tk + b * p.stb + h * p.sth;
    const u16* tv = (const u16*)p.tv + b * p.stb + h * p.sth;
    u32 qf[D / 16][2];  // B fragments: head g at coordinates 16 kt + 2 t4 + {0, 1} and + 8
#pragma unroll
    for (int kt = 0; kt < D / 16; kt++) {
        const int d = 16 * kt + 2 * t4;
        qf[kt][0] = g < G ? ld2(q, d, d + 1) : 0u;
        qf[kt][1] = g < G ? ld2(q, d + 8, d + 9) : 0u;
    }
    float acc[D / 16][4], m[2] = {NEG_BIG, NEG_BIG}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < D / 16; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int sel = (g & 1) ? 0x7632 : 0x5410, src0 = (2 * t4) * 4 + (g >> 1), last = p.t_len - 1;
    for (int c0 = 16 * warp; c0 < p.t_len; c0 += 16 * NWARPS) {
        const long long r0 = (long long)min(c0 + g, last) * p.stt, r1 = (long long)min(c0 + g + 8, last) * p.stt;
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kt = 0; kt < D / 16; kt++) {
            const int d = 16 * kt + 2 * t4;
            mma_tail<QTYPE>(s, ld2(tk, r0 + d, r0 + d + 1), ld2(tk, r1 + d, r1 + d + 1),
                            ld2(tk, r0 + d + 8, r0 + d + 9), ld2(tk, r1 + d + 8, r1 + d + 9), qf[kt][0], qf[kt][1]);
        }
        float alpha[2];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int t = c0 + g + 8 * (i >> 1);
            s[i] = finish_score(p, s[i], b, p.n + t, t < p.t_len);
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float mx = fmaxf(s[j], s[j + 2]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float mn = fmaxf(m[j], mx);
            alpha[j] = ex2(m[j] - mn);
            m[j] = mn;
            l[j] *= alpha[j];
        }
        float pr[4];
#pragma unroll
        for (int i = 0; i < 4; i++) pr[i] = ex2(s[i] - m[i & 1]), l[i & 1] += pr[i];
        u32 pb0, pb1;
        prob_fragment<QTYPE>(pr, 1.f, 1.f, src0, sel, pb0, pb1);
        const long long v0 = (long long)min(c0 + 2 * t4, last) * p.stt;
        const long long v1 = (long long)min(c0 + 2 * t4 + 1, last) * p.stt;
        const long long v8 = (long long)min(c0 + 2 * t4 + 8, last) * p.stt;
        const long long v9 = (long long)min(c0 + 2 * t4 + 9, last) * p.stt;
#pragma unroll
        for (int mt = 0; mt < D / 16; mt++) {
            const int d = 16 * mt + g;
            acc[mt][0] *= alpha[0], acc[mt][1] *= alpha[1], acc[mt][2] *= alpha[0], acc[mt][3] *= alpha[1];
            mma_tail<QTYPE>(acc[mt], ld2(tv, v0 + d, v1 + d), ld2(tv, v0 + d + 8, v1 + d + 8), ld2(tv, v8 + d, v9 + d),
                            ld2(tv, v8 + d + 8, v9 + d + 8), pb0, pb1);
        }
    }
    store_ml(sm, m, l, warp, g, t4);
#pragma unroll
    for (int j = 0; j < 2; j++)
        if (2 * t4 + j < G)
#pragma unroll
            for (int mt = 0; mt < D / 16; mt++)
                sm.acc[warp][2 * t4 + j][16 * mt + g] = acc[mt][j],
                sm.acc[warp][2 * t4 + j][16 * mt + g + 8] = acc[mt][j + 2];
    merge_and_store(p, sm, pid_bh * (p.S + 1) + p.S);
}

#ifndef TAILMMA
#define TAILMMA 1  // the tail on tensor cores (float16 / bfloat16 queries); 0: tail_split
#endif

__device__ __forceinline__ void tail(const Params& p, Smem& sm, int pid_bh) {
    if (TAILMMA && QTYPE != 2) tail_mma(p, sm, pid_bh, pid_bh / p.H, pid_bh % p.H);
    else tail_split(p, sm, pid_bh, pid_bh / p.H, pid_bh % p.H);
}

#if DBG == 7
__device__ __forceinline__ unsigned long long gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define TRACE(i, v) \
    if (threadIdx.x == 0) p.trace[8 * blockIdx.x + (i)] = (v)
#else
#define TRACE(i, v)
#endif

// The code piece of block j >= BH (see Params): its (b, h), partial index and tokens [lo, hi).
struct Piece {
    int bh, s, lo, hi;
};

__device__ __forceinline__ Piece piece_of(const Params& p, int j) {
    j -= p.BH;
    const bool is_long = j < p.BH * p.n_long;
    if (!is_long) j -= p.BH * p.n_long;
    const int per = is_long ? p.n_long : p.n_short, bh = j / per, k = j - bh * per;
    const int lo = min(p.n, is_long ? k * p.long_len : p.n_long * p.long_len + k * p.short_len);
    return {bh, is_long ? k : p.n_long + k, lo, min(p.n, lo + (is_long ? p.long_len : p.short_len))};
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINB) tq_decode_split(const Params p) {
    __shared__ Smem sm;
    TRACE(0, gtime());
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");  // (PDL) the merge may launch once every block has started
#endif
    // the block's piece: the long pieces, the short ones, then the tails, whose short blocks fill slots of the grid's
    // drain (TAILS_LAST; 0 puts them first, as until round 19: about 1 us slower at B 8, T 32k, kernels_tails_r19.json)
    int j = blockIdx.x;
    const int tj = TAILS_LAST ? j - ((int)gridDim.x - p.BH) : j;
    if (tj >= 0 && tj < p.BH) {
        tail(p, sm, tj);
        TRACE(6, gtime());
#if DBG == 7
        u32 smid;
        asm("mov.u32 %0, %%smid;" : "=r"(smid));
        TRACE(7, smid);
#endif
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const Piece pc = piece_of(p, TAILS_LAST ? j + p.BH : j);
    const int pid_bh = pc.bh, pid_s = pc.s, lo = pc.lo, hi = pc.hi, b = pid_bh / p.H;
    u32 ktab0[8], ktab1[8], vtab0[8], vtab1[8];
#pragma unroll
    for (int i = 0; i < 8; i++) ktab0[i] = p.ktab[0][i], ktab1[i] = p.ktab[1][i], vtab0[i] = p.vtab[0][i],
                                vtab1[i] = p.vtab[1][i];
    u32 qb0[KD0 / 16][2], qb1[KDG1 / 16][2];  // query fragments and <q, mu_k> of heads 2 t4, 2 t4 + 1: from the
    float qm[2] = {0.f, 0.f};                  // query kernel, read once the first units' copies are under way
    u32 qbq[RQ / 16][2];                       // QJL: q_qjl's fragments
    const u32 qtab[8] = {0u, 0u, 0x3CBCu, 0u, 0u, 0u, 0u, 0u};  // QJL: float16 -1, +1 (entries 0, 1)

    // O^T fragments per value group: rows (coords g * D_i / 8 + 2 mt, + 1), columns (heads 2 t4, 2 t4 + 1)
    float acc0[VD0 / 16][4], acc1[VDG1 / 16][4];
#pragma unroll
    for (int i = 0; i < VD0 / 16; i++) acc0[i][0] = acc0[i][1] = acc0[i][2] = acc0[i][3] = 0.f;
#pragma unroll
    for (int i = 0; i < VDG1 / 16; i++) acc1[i][0] = acc1[i][1] = acc1[i][2] = acc1[i][3] = 0.f;
    float m[2] = {NEG_BIG, NEG_BIG}, l[2] = {0.f, 0.f};
    // the rotated query of (b, h) (written by the query kernel)
    const auto read_query = [&](int bh) {
        const float* qr = p.ws + ((long long)bh * G + g) * D;
        const float qs = QSCALED ? p.scaling * LOG2E : 1.f;  // (see code_score)
        query_fragments<KD0>(qb0, qr + t4 * (KD0 / 4), g < G, qs);
        if (KD1 > 0) query_fragments<KDG1>(qb1, qr + KD0 + t4 * (KD1 / 4), g < G, qs);
        if (QJL) query_fragments<RQ>(qbq, p.qq + ((long long)bh * G + g) * RQ + t4 * (RQ / 4), g < G, qs);
#if HAS_KMEAN
#pragma unroll
        for (int j = 0; j < 2; j++)
            if (2 * t4 + j < G) qm[j] = p.ws[(long long)p.BH * G * D + (long long)bh * G + 2 * t4 + j] * qs;
#endif
    };
    // this warp's state -> shared memory -> one merged partial of the block
    const auto store_partial = [&](int part_idx) {
        store_ml(sm, m, l, warp, g, t4);
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int hh = 2 * t4 + j;
            if (hh < G) {
#pragma unroll
                for (int mt = 0; mt < VD0 / 16; mt++) {
                    sm.acc[warp][hh][g * (VD0 / 8) + vslot<VB0, VD0 / 8>(2 * mt)] = acc0[mt][j];
                    sm.acc[warp][hh][g * (VD0 / 8) + vslot<VB0, VD0 / 8>(2 * mt + 1)] = acc0[mt][j + 2];
                }
#pragma unroll
                for (int mt = 0; mt < (VD1 > 0 ? VD1 / 16 : 0); mt++) {
                    sm.acc[warp][hh][VD0 + g * (VD1 / 8) + vslot<VB1, VD1 / 8>(2 * mt)] = acc1[mt][j];
                    sm.acc[warp][hh][VD0 + g * (VD1 / 8) + vslot<VB1, VD1 / 8>(2 * mt + 1)] = acc1[mt][j + 2];
                }
            }
        }
        merge_and_store(p, sm, part_idx);
    };

    const int sel = (g & 1) ? 0x7632 : 0x5410;  // this lane's head (g) half of a shuffled half2
    const int src0 = (2 * t4) * 4 + (g >> 1);
    // bit of a slice's first code in its first word
    const int ksh0 = (KB0 * t4 * (KD0 / 4)) & 31, ksh1 = (KB1 * t4 * (KD1 / 4)) & 31, qsh = (t4 * (RQ / 4)) & 31;
    const int vsh0 = (VB0 * g * (VD0 / 8)) & 31, vsh1 = (VB1 * g * (VD1 / 8)) & 31;
    // one unit of this warp (its raw data in cur) into the online softmax and the accumulators
    const auto step = [&](const Unit& cur, int t0) {
        float s[UC][4];
#pragma unroll
        for (int c = 0; c < UC; c++) {
            float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
            score_group<KB0, KD0, KW0, KSYM0>(s0, cur.k0[c][0], cur.k0[c][1], ksh0, ktab0, qb0);
            if (KD1 > 0) score_group<KB1, KDG1, KW1, KSYM1>(s1, cur.k1[c][0], cur.k1[c][1], ksh1, ktab1, qb1);
            float sq[4] = {0.f, 0.f, 0.f, 0.f};
            if (QJL) score_group<1, RQ, QW, false>(sq, cur.kq[c][0], cur.kq[c][1], qsh, qtab, qbq);
#pragma unroll
            for (int i = 0; i < 4; i++) {  // i: (token g + 8 (i >> 1), head 2 t4 + (i & 1))
                const int t = t0 + 16 * c + g + 8 * (i >> 1);
                float x = s0[i] * raw_f<KNORM>(cur.kn[c][i >> 1][0]) + qm[i & 1];
                if (KD1 > 0) x += s1[i] * raw_f<KNORM>(cur.kn[c][i >> 1][1]);
                if (QJL) x += sq[i] * raw_f<QNORM>(cur.qn[c][i >> 1]) * p.qjl_scale;
                s[c][i] = QSCALED ? code_score(p, x, b, HAS_MASK ? min(t, hi - 1) : t) : finish_score(p, x, b, t, t < hi);
            }
        }
        if (QSCALED && t0 + UT > hi) {  // the warp's last unit: its tokens past the piece (a branch, not predicated)
            asm volatile("");
            const int lim = hi - t0 - g;
#pragma unroll
            for (int c = 0; c < UC; c++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    if (16 * c + 8 * (i >> 1) >= lim) s[c][i] = -__int_as_float(0x7f800000);
        }
        // online softmax per head over the unit's tokens (lanes of one t4): the running max m (MSLACK above the
        // largest score seen) only moves when some lane's own scores pass it, after the first unit rarely, so the
        // shuffles and the rescale run only then
        float mx[2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            mx[j] = fmaxf(s[0][j], s[0][j + 2]);
#pragma unroll
            for (int c = 1; c < UC; c++) mx[j] = fmaxf(mx[j], fmaxf(s[c][j], s[c][j + 2]));
        }
        if (__any_sync(0xffffffffu, !LAZYMAX || mx[0] > m[0] || mx[1] > m[1])) {
            float alpha[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 4));
                mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 8));
                mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 16));
                const float mn = fmaxf(m[j], mx[j] + MSLACK);
                alpha[j] = ex2(m[j] - mn);
                m[j] = mn;
            }
#pragma unroll
            for (int i = 0; i < VD0 / 16; i++)
                acc0[i][0] *= alpha[0], acc0[i][1] *= alpha[1], acc0[i][2] *= alpha[0], acc0[i][3] *= alpha[1];
#pragma unroll
            for (int i = 0; i < (VD1 > 0 ? VD1 / 16 : 0); i++)
                acc1[i][0] *= alpha[0], acc1[i][1] *= alpha[1], acc1[i][2] *= alpha[0], acc1[i][3] *= alpha[1];
            l[0] *= alpha[0], l[1] *= alpha[1];
        }
#pragma unroll
        for (int c = 0; c < UC; c++) {
            float pr[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                pr[i] = ex2(s[c][i] - m[i & 1]);
                l[i & 1] += pr[i];
            }
            u32 pb0, pb1;
            prob_fragment(pr, raw_f<VNORM>(cur.vn[c][0][0]), raw_f<VNORM>(cur.vn[c][1][0]), src0, sel, pb0, pb1);
            value_group<VB0, VD0, VW0, VSYM0>(acc0, cur.v0[c], vsh0, vtab0, pb0, pb1);
            if (VD1 > 0) {
                prob_fragment(pr, raw_f<VNORM>(cur.vn[c][0][1]), raw_f<VNORM>(cur.vn[c][1][1]), src0, sel, pb0, pb1);
                value_group<VB1, VDG1, VW1, VSYM1>(acc1, cur.v1[c], vsh1, vtab1, pb0, pb1);
            }
        }
    };
    const Rows rows = head_rows(p, pid_bh);
    const int units = (hi - lo + UT - 1) / UT;
#if RING
    // ring of RING unit slots per warp (see copy_unit); unit i goes to slot i % RING, one commit group per unit (empty
    // past the warp's last unit, so "all but the newest RING - 1 groups" is always unit i)
    extern __shared__ __align__(16) char dsm[];
    char* ring = dsm + warp * RING * SLOT;
    const int mine = warp < units ? (units - warp + NWARPS - 1) / NWARPS : 0;  // units of this warp
    const Srcs srcs = srcs_of(rows);
    if (lane == 0) {
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < RING_BYTES) __trap();  // the host sized the ring for another configuration
    }
    TRACE(1, gtime());
    for (int i = lane * 16; i < RING * SLOT; i += 32 * 16) *(uint4*)(ring + i) = make_uint4(0, 0, 0, 0);
    __syncwarp();  // zeroed slots (rows past the last code read zeros or older units' rows)
#pragma unroll
    for (int i = 0; i < RING; i++) {
        if (i < mine) copy_unit(srcs, smem_addr(ring + i * SLOT), lo + UT * (warp + NWARPS * i), p.n, lane);
        commit();
    }
    TRACE(2, gtime());
#else
    Unit cur;
    if (warp < units) load_unit(rows, cur, lo + UT * warp, p.n - 1, g, t4);
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && DBG != 9
    asm volatile("griddepcontrol.wait;" ::: "memory");  // (launched early, PDL) the query kernel's results are in
#endif
    TRACE(3, gtime());
    read_query(pid_bh);
#if RING
    for (int i = 0; i < mine; i++) {
        const int slot = i % RING;
        if (i > 0) {  // the previous unit's slot is free (every lane read it) for the unit RING - 1 ahead
            __syncwarp();
            const int k = i - 1 + RING;
            if (k < mine)
                copy_unit(srcs, smem_addr(ring + (k % RING) * SLOT), lo + UT * (warp + NWARPS * k), p.n, lane);
            commit();
        }
        asm volatile("cp.async.wait_group %0;" ::"n"(RING - 1) : "memory");
        __syncwarp();  // every lane's copies of unit i visible to the warp
#if DBG == 7
        if (i == 0) TRACE(4, gtime());
        if (i == mine - 1) TRACE(5, gtime());
#endif
        Unit cur;
        load_unit(slot_rows(ring + slot * SLOT, rows), cur, 0, UT - 1, g, t4);
        step(cur, lo + UT * (warp + NWARPS * i));
    }
#else
    for (int u = warp; u < units; u += NWARPS) {
        Unit nxt;
        if (u + NWARPS < units) load_unit(rows, nxt, lo + UT * (u + NWARPS), p.n - 1, g, t4);
        step(cur, lo + UT * u);
        cur = nxt;
    }
#endif
    store_partial(pid_bh * (p.S + 1) + pid_s);
#if DBG == 7
    __syncthreads();
    u32 smid;
    asm("mov.u32 %0, %%smid;" : "=r"(smid));
    TRACE(6, gtime());
    TRACE(7, smid | (u32)units << 16);
#endif
}

// ---- The merge of the split pass's partials, where the values use the rotation "hadamard" with one channel group
// (launched after the split pass with PDL). A block of one warp per query head (timed the same as a block of G warps
// per (b, h): kernels_qw_r16.json) merges the head's S code partials (S <= 32) in one L2 round trip (every partial's
// accumulator is loaded before the maximum is known), rotates them back by the transform above (no R), then * s_v,
// + l_codes mu_v and the tail partial (in the original space), all divided by the total: decode.py's _combine.
struct MergeParams {
    const float* ws;      // the split pass's workspace (rotated queries, then the partials: Params.part)
    void* out;            // (B, 1, Hq, D) in the query dtype; head gq of (b, h) is row bh * G + gq
    const float* vscale;  // the values' channel scales s_v and means mu_v per (b, h): (BH, D) each, or null
    const float* vmean;
    int S, BH;
    u32 vsg[3][8];  // the value rotation's signs per round (hadamard_words)
};

#define MP (D == 256 ? 16 : 32)  // partials loaded at once (EC floats per lane each)

__device__ __forceinline__ void load_ec(float (&x)[EC], const float* src) {
#pragma unroll
    for (int i = 0; i < EC; i += 2) {
        const float2 v = __ldcg((const float2*)(src + i));
        x[i] = v.x, x[i + 1] = v.y;
    }
}

template <int T>
__device__ __forceinline__ void store_f(void* dst, long long i, float v) {
    if (T == 2) {
        ((float*)dst)[i] = v;
        return;
    }
    u16 h;
    if (T == 0) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    ((u16*)dst)[i] = h;
}

extern "C" __global__ void __launch_bounds__(32) tq_decode_merge(const MergeParams p) {
    const int lane = threadIdx.x, gq = blockIdx.x % G, bh = blockIdx.x / G;
    float sv[EC], mv[EC];  // (layer constants: read before the wait)
#pragma unroll
    for (int i = 0; i < EC; i++) {
        const long long c = (long long)bh * D + EC * lane + i;
        sv[i] = HAS_VSCALE ? p.vscale[c] : 1.f;
        mv[i] = HAS_VMEAN ? p.vmean[c] : 0.f;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");  // (PDL) the split pass is done
#endif
    if (DBG == 11 || DBG == 12) return;
    const long long PG = (long long)p.BH * (p.S + 1) * G;
    const float* mp = p.ws + (long long)p.BH * G * (D + 1);
    const float* lp = mp + PG;
    const float* ap = lp + PG + EC * lane;
    const long long row0 = (long long)bh * (p.S + 1) * G + gq;  // partial s of head gq: row row0 + s G
    float a[MP][EC];
    const auto load_batch = [&](int s0) {
#pragma unroll
        for (int j = 0; j < MP; j++) {
            if (s0 + j < p.S) {
                load_ec(a[j], ap + (row0 + (long long)(s0 + j) * G) * D);
            } else {
#pragma unroll
                for (int i = 0; i < EC; i++) a[j][i] = 0.f;
            }
        }
    };
    load_batch(0);
    float at[EC];  // the tail's partial
    load_ec(at, ap + (row0 + (long long)p.S * G) * D);
    const float mt = __ldcg(mp + row0 + (long long)p.S * G), lt = __ldcg(lp + row0 + (long long)p.S * G);
    float ms = NEG_BIG, ls = 0.f;  // lane s: partial s's
    if (lane < p.S) ms = __ldcg(mp + row0 + (long long)lane * G), ls = __ldcg(lp + row0 + (long long)lane * G);
    float big = ms;
#pragma unroll
    for (int m = 16; m; m >>= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, m));
    const float w = lane < p.S ? ex2(ms - big) : 0.f;
    float lc = w * ls;
#pragma unroll
    for (int m = 16; m; m >>= 1) lc += __shfl_xor_sync(0xffffffffu, lc, m);
    float acc[EC];
#pragma unroll
    for (int i = 0; i < EC; i++) acc[i] = 0.f;
    for (int s0 = 0; s0 < p.S; s0 += MP) {
        if (s0) load_batch(s0);
#pragma unroll
        for (int j = 0; j < MP; j++) {
            const float wj = __shfl_sync(0xffffffffu, w, (s0 + j) & 31);
#pragma unroll
            for (int i = 0; i < EC; i++) acc[i] = fmaf(wj, a[j][i], acc[i]);
        }
    }
    const float nb = fmaxf(big, mt), alpha = ex2(big - nb), wt = ex2(mt - nb);
    lc *= alpha;
    const float inv = 1.f / (lc + wt * lt);
#pragma unroll
    for (int i = 0; i < EC; i++) acc[i] *= alpha * inv * HNORM;
    // the inverse rotation x = s0 F(s1 F(s2 F(y)))
    sylvester(acc, lane);
    flip_signs(acc, p.vsg[2], lane), sylvester(acc, lane);
    flip_signs(acc, p.vsg[1], lane), sylvester(acc, lane);
    flip_signs(acc, p.vsg[0], lane);
    const long long o = ((long long)bh * G + gq) * D + EC * lane;
#pragma unroll
    for (int i = 0; i < EC; i++)
        store_f<QTYPE>(p.out, o + i, fmaf(acc[i], sv[i], fmaf(lc * inv, mv[i], wt * inv * at[i])));
}

// ---- The query kernel where the keys use the rotation "hadamard" with one channel group (not QJL): one block of G
// warps per (b, h); warp gq writes head gq's q_rot = (q s_k) R_k and <q, mu_k> into ws (read_query), as decode.py's
// _prep_kernel does with the dense R and 3xTF32 products. It lets the split pass start at once (PDL, p.early).
extern "C" __global__ void __launch_bounds__(G * 32) tq_decode_query(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (p.early) asm volatile("griddepcontrol.launch_dependents;");
#endif
    if (DBG == 10 || DBG == 12) return;
    const int lane = threadIdx.x & 31, gq = threadIdx.x >> 5, bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
    float x[EC], qm = 0.f;
#pragma unroll
    for (int i = 0; i < EC; i++) {
        const int c = EC * lane + i;
        x[i] = load_f<QTYPE>(p.q, b * p.sqb + (h * G + gq) * p.sqh + c);
#if HAS_KMEAN
        qm = fmaf(x[i], p.kmean[(long long)bh * D + c], qm);
#endif
#if HAS_KSCALE
        x[i] *= p.kscale[(long long)bh * D + c];
#endif
    }
#pragma unroll
    for (int k = 0; k < 3; k++) flip_signs(x, p.ksg[k], lane), sylvester(x, lane);
    float* ws = const_cast<float*>(p.ws);  // (read-only for the split pass)
    float* qr = ws + ((long long)bh * G + gq) * D + EC * lane;
#pragma unroll
    for (int i = 0; i < EC; i += 2) *(float2*)(qr + i) = make_float2(x[i] * HNORM, x[i + 1] * HNORM);
#if HAS_KMEAN
#pragma unroll
    for (int m = 16; m; m >>= 1) qm += __shfl_xor_sync(0xffffffffu, qm, m);
    if (lane == 0) ws[(long long)p.BH * G * D + (long long)bh * G + gq] = qm;
#endif
}
