/* The AVX-512 VPOPCNTDQ scans: 8 rows of 64-bit words, or 16 of 32-bit words, a vector. Compiled
 * for that target only through function attributes; pick_scan runs them only on a CPU that has it. */
#include "_hamming.h"

#ifdef SH_X86
#define AVX512 __attribute__((target("popcnt,avx512f,avx512vpopcntdq"), always_inline)) static inline

/* Distances of 8 consecutive rows starting at `c` (row-major, W words each), one per lane. */
AVX512 __m512i dist8(const uint64_t *c, const int W, const __m512i vq) {
    if (W == 1) return _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(c), vq));
    const __m512i ev = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i od = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
#define PC(j) _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(c + 8 * (j)), vq))
#define PAIR(a, b) _mm512_add_epi64(_mm512_permutex2var_epi64(a, ev, b), _mm512_permutex2var_epi64(a, od, b))
    if (W == 2) return PAIR(PC(0), PC(1));
    /* W == 4: two rounds of adding neighbouring lanes. */
    return PAIR(PAIR(PC(0), PC(1)), PAIR(PC(2), PC(3)));
#undef PC
#undef PAIR
}

AVX512 void scan_avx512_w(const uint64_t *codes, int64_t r0, int64_t r1, const int W, const uint64_t *q,
                          topk_t *t, const uint8_t *dead) {
    /* The query repeated across lanes: W divides 8, so lane j holds word j % W. */
    uint64_t qq[8];
    for (int j = 0; j < 8; j++) qq[j] = q[j % W];
    const __m512i vq = _mm512_loadu_si512(qq);
    int64_t i = r0;
    for (; i + 32 <= r1; i += 32) {
        const __m512i thr = _mm512_set1_epi64(topk_thr(t));
        const uint64_t *c = codes + i * W;
        __m512i d0 = dist8(c, W, vq), d1 = dist8(c + 8 * W, W, vq);
        __m512i d2 = dist8(c + 16 * W, W, vq), d3 = dist8(c + 24 * W, W, vq);
        /* One compare for the 32 rows: the common case once the top-k has warmed up is that none passes. */
        if (!_mm512_cmplt_epu64_mask(_mm512_min_epu64(_mm512_min_epu64(d0, d1), _mm512_min_epu64(d2, d3)), thr))
            continue;
        uint32_t m = (uint32_t)_mm512_cmplt_epi64_mask(d0, thr) | (uint32_t)_mm512_cmplt_epi64_mask(d1, thr) << 8 |
                     (uint32_t)_mm512_cmplt_epi64_mask(d2, thr) << 16 | (uint32_t)_mm512_cmplt_epi64_mask(d3, thr) << 24;
        uint64_t dd[32];
        _mm512_storeu_si512(dd, d0);
        _mm512_storeu_si512(dd + 8, d1);
        _mm512_storeu_si512(dd + 16, d2);
        _mm512_storeu_si512(dd + 24, d3);
        while (m) {
            int j = __builtin_ctz(m);
            m &= m - 1;
            topk_push(t, i + j, (int)dd[j], dead); /* re-checks against the (maybe lower) limit */
        }
    }
    for (; i < r1; i++) {
        int dist = 0;
        for (int w = 0; w < W; w++) dist += (int)_mm_popcnt_u64(codes[i * W + w] ^ q[w]);
        topk_push(t, i, dist, dead);
    }
}

__attribute__((target("popcnt,avx512f,avx512vpopcntdq"))) void scan_avx512(const void *codes_, int64_t r0,
                                                                    int64_t r1, int W, const void *q_,
                                                                    topk_t *t, const uint8_t *dead) {
    const uint64_t *codes = codes_, *q = q_;
    switch (W) {
    case 1: scan_avx512_w(codes, r0, r1, 1, q, t, dead); break;
    case 2: scan_avx512_w(codes, r0, r1, 2, q, t, dead); break;
    case 4: scan_avx512_w(codes, r0, r1, 4, q, t, dead); break;
    default: scan_popcnt(codes, r0, r1, W, q, t, dead);
    }
}

/* 32-bit codes, 16 rows a vector: half the bytes and half the popcounts of the 64-bit words. */
__attribute__((target("popcnt,avx512f,avx512vpopcntdq"))) void scan32_avx512(const void *codes_, int64_t r0,
                                                                      int64_t r1, int W, const void *q_,
                                                                      topk_t *t, const uint8_t *dead) {
    const uint32_t *codes = codes_, q = *(const uint32_t *)q_;
    (void)W;
    const __m512i vq = _mm512_set1_epi32((int)q);
    int64_t i = r0;
    for (; i + 64 <= r1; i += 64) {
        const __m512i thr = _mm512_set1_epi32(topk_thr(t));
        const uint32_t *c = codes + i;
#define D16(j) _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_loadu_si512(c + 16 * (j)), vq))
        __m512i d0 = D16(0), d1 = D16(1), d2 = D16(2), d3 = D16(3);
#undef D16
        if (!_mm512_cmplt_epu32_mask(_mm512_min_epu32(_mm512_min_epu32(d0, d1), _mm512_min_epu32(d2, d3)), thr))
            continue;
        uint64_t m = (uint64_t)_mm512_cmplt_epu32_mask(d0, thr) | (uint64_t)_mm512_cmplt_epu32_mask(d1, thr) << 16 |
                     (uint64_t)_mm512_cmplt_epu32_mask(d2, thr) << 32 | (uint64_t)_mm512_cmplt_epu32_mask(d3, thr) << 48;
        uint32_t dd[64];
        _mm512_storeu_si512(dd, d0);
        _mm512_storeu_si512(dd + 16, d1);
        _mm512_storeu_si512(dd + 32, d2);
        _mm512_storeu_si512(dd + 48, d3);
        while (m) {
            int j = __builtin_ctzll(m);
            m &= m - 1;
            topk_push(t, i + j, (int)dd[j], dead); /* re-checks against the (maybe lower) limit */
        }
    }
    for (; i < r1; i++) topk_push(t, i, (int)_mm_popcnt_u32(codes[i] ^ q), dead);
}
#endif
