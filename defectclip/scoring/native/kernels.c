/* Scoring kernels for CPUs with Intel AMX (loaded by defectclip/scoring/native/__init__.py). This first
   one: nearest-neighbour distances, every query's Euclidean distance to its nearest bank row; the model
   input and the patch features follow, each under its own header.

   Why a kernel of its own: through torch the search is one bfloat16 matrix product that writes a
   bank x queries score matrix (5,000 x 784 bfloat16 = 7.8 MB for one 224 px image) and a second pass
   that reads it back for the minimum; writing and re-reading those scores cost as much as the
   products themselves. Here each 16 x 16 block of products is reduced to its per-query minimum while
   it is still in a tile register, so no score matrix exists.

   Numbers: queries arrive as float32 and are rounded to bfloat16 (round to nearest even, as torch
   rounds); the bank arrives already rounded, as rows [-2 b, |b|^2 high, |b|^2 low, 0...] (the squared
   norm of the rounded row in two bfloat16 parts: 16 bits together). A query row [q, 1, 1, 0...]
   times a bank row is |b|^2 - 2 q.b, accumulated in float32; the query's own squared norm is
   added in float32 after the minimum. The result is the distance between the rounded vectors to
   float32 accumulation and the 16-bit bank norm (no bfloat16 rounding of the output).

   Layouts (the caller pads; see defectclip/scoring/native/__init__.py):
   - bank: bank_rows x dim_padded bfloat16 (uint16) rows as above, bank_rows a multiple of 64,
     dim_padded a multiple of 32 and at least dim + 2; padding rows hold a huge norm and no features;
   - queries: count x dim float32 rows (contiguous);
   - scratch: (1 + 16 * ceil(count / 16)) x dim_padded uint16 (one row, then the packed queries);
   - best: 2 * 16 * ceil(count / 16) float32 (running minima, then the queries' squared norms);
   - out: count float32 distances. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define BF16_ONE 0x3F80

/* Linux hands out AMX tile state only to processes that ask for it (oneDNN asks too). 0 = granted. */
int dc_amx_request(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Rounds 16 query rows (from `first`; zero past `count`) to bfloat16, round to nearest even as torch
   rounds, and lays them out as AMX multiplies them ("VNNI": per 32 feature columns a 16 x 16 block
   of 32-bit words, word (p, n) = (q_n[2p], q_n[2p + 1])); returns their squared norms (of the
   rounded values, float32). `row` is a dim_padded scratch row of bfloat16. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void pack_block(const float *queries, int64_t count, int64_t dim, int64_t dim_padded,
                       int64_t first, uint16_t *row, uint32_t *packed, float *norms) {
    int64_t words = dim_padded / 2;
    for (int64_t n = 0; n < 16; n++) {
        memset(row, 0, (size_t)dim_padded * sizeof(uint16_t));
        __m512 sum = _mm512_setzero_ps();
        if (first + n < count) {
            const float *source = queries + (first + n) * dim;
            for (int64_t k = 0; k < dim; k += 16) {
                int64_t left = dim - k;
                __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                __m512 values = _mm512_maskz_loadu_ps(mask, source + k);
                __m256i rounded = (__m256i)_mm512_cvtneps_pbh(values);
                _mm256_mask_storeu_epi16(row + k, mask, rounded);
                __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
                sum = _mm512_fmadd_ps(back, back, sum);
            }
        }
        norms[n] = _mm512_reduce_add_ps(sum);
        row[dim] = row[dim + 1] = BF16_ONE;  /* times the bank's two squared-norm columns */
        const uint32_t *pairs = (const uint32_t *)row;
        for (int64_t w = 0; w < words; w++) packed[(w / 16) * 256 + (w % 16) * 16 + n] = pairs[w];
    }
}

/* min over the 16 bank rows of a product tile (|b|^2 - 2 q.b), one lane per query, into `best` */
__attribute__((target("avx512f")))
static inline __m512 fold_tile(const float *products, __m512 best) {
    for (int r = 0; r < 16; r++) best = _mm512_min_ps(best, _mm512_load_ps(products + 16 * r));
    return best;
}

/* The bank is taken 64 rows at a time into four independent product tiles (each tile's chain of
   dot-product instructions waits for the previous one; four chains keep the AMX unit busy), and
   those 64 rows (20 KB at 152 features) stay in the L1 cache while every block of 16 queries passes
   by: the queries (250 KB for a 224 px image) are read from L2 once per 64 bank rows, where the
   other order read the whole bank (1.6 MB) from L2 once per 16 queries. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
void dc_nearest_amx(const uint16_t *bank, int64_t bank_rows, int64_t dim_padded,
                    const float *queries, int64_t count, int64_t dim, uint16_t *scratch, float *best,
                    float *out) {
    int64_t k_blocks = dim_padded / 32, query_blocks = (count + 15) / 16;
    int64_t stride = dim_padded * (int64_t)sizeof(uint16_t);
    int64_t block = 16 * dim_padded;  /* elements in 16 rows */
    uint16_t *packed = scratch + dim_padded;
    float *query_sq = best + 16 * query_blocks;
    for (int64_t q = 0; q < query_blocks; q++) {
        pack_block(queries, count, dim, dim_padded, 16 * q, scratch, (uint32_t *)(packed + q * block), query_sq + 16 * q);
        for (int n = 0; n < 16; n++) best[16 * q + n] = INFINITY;
    }

    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int t = 0; t < 7; t++) {  /* 0-3: 16 x 16 float32 products, 4: 16 queries, 5-6: 16 bank rows */
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    float products[4 * 256] __attribute__((aligned(64)));
    for (int64_t b = 0; b < bank_rows; b += 64) {
        const uint16_t *rows = bank + b * dim_padded;
        for (int64_t q = 0; q < query_blocks; q++) {
            const uint16_t *mine = packed + q * block;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < k_blocks; k++) {
                _tile_loadd(4, mine + k * 512, 64);
                _tile_loadd(5, rows + k * 32, stride);
                _tile_dpbf16ps(0, 5, 4);
                _tile_loadd(6, rows + block + k * 32, stride);
                _tile_dpbf16ps(1, 6, 4);
                _tile_loadd(5, rows + 2 * block + k * 32, stride);
                _tile_dpbf16ps(2, 5, 4);
                _tile_loadd(6, rows + 3 * block + k * 32, stride);
                _tile_dpbf16ps(3, 6, 4);
            }
            _tile_stored(0, products, 64);
            _tile_stored(1, products + 256, 64);
            _tile_stored(2, products + 512, 64);
            _tile_stored(3, products + 768, 64);
            __m512 running = _mm512_loadu_ps(best + 16 * q);
            for (int t = 0; t < 4; t++) running = fold_tile(products + 256 * t, running);
            _mm512_storeu_ps(best + 16 * q, running);
        }
    }
    _tile_release();

    /* + |q|^2, clamped at 0 (rounding can leave a tiny negative), square root */
    for (int64_t q = 0; q < query_blocks; q++) {
        __m512 squared = _mm512_add_ps(_mm512_loadu_ps(best + 16 * q), _mm512_loadu_ps(query_sq + 16 * q));
        __m512 distance = _mm512_sqrt_ps(_mm512_max_ps(squared, _mm512_setzero_ps()));
        int64_t left = count - 16 * q;
        __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        _mm512_mask_storeu_ps(out + 16 * q, mask, distance);
    }
}

/* --------------------------------------------------------------------------------------------------
   Model input: (x - mean) / std of a C x H x W float32 image, written as H x W x C bfloat16 (the
   channels-last layout the backbone's convolutions run fastest on), in one pass.

   Through torch the same took four passes over the image (normalise, re-lay out, round, plus the
   copies between them): ~0.6 ms for a 224 px image on this project's CPU, where the image itself
   is read in ~0.1. `scale` = 1 / std and `shift` = -mean / std per channel; the value is
   x * scale + shift in float32 (fused multiply-add), rounded to nearest even. */

static inline uint16_t round_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dc_normalize_nhwc_bf16(const float *image, int64_t channels, int64_t height, int64_t width,
                            int64_t stride_c, int64_t stride_h, int64_t stride_w,
                            const float *scale, const float *shift, uint16_t *out) {
    uint16_t rounded[16] __attribute__((aligned(64)));
    for (int64_t c = 0; c < channels; c++) {
        __m512 a = _mm512_set1_ps(scale[c]), b = _mm512_set1_ps(shift[c]);
        for (int64_t y = 0; y < height; y++) {
            const float *row = image + c * stride_c + y * stride_h;
            uint16_t *target = out + y * width * channels + c;
            int64_t x = 0;
            if (stride_w == 1) {
                for (; x + 16 <= width; x += 16) {
                    __m512 value = _mm512_fmadd_ps(_mm512_loadu_ps(row + x), a, b);
                    _mm256_store_si256((__m256i *)rounded, (__m256i)_mm512_cvtneps_pbh(value));
                    for (int i = 0; i < 16; i++) target[(x + i) * channels] = rounded[i];
                }
            }
            for (; x < width; x++) target[x * channels] = round_bf16(fmaf(row[x * stride_w], scale[c], shift[c]));
        }
    }
}

/* --------------------------------------------------------------------------------------------------
   Patch features from the backbone's bfloat16 channels-last maps, in one call: each map 3 x 3
   averaged (stride 1, zero padding counted, as torch's avg_pool2d), brought to the finest grid by
   bilinear interpolation (align_corners=False, as torch's interpolate), and the maps' channels
   concatenated into float32 height x width x channels rows.

   Through torch these were six ops and their copies (~0.4-0.7 ms an image on this project's CPU)
   on ~100 KB of numbers; the arithmetic is the same, summed in another order (float32 rounding). */

/* 3 x 3 mean of a h x w x c bfloat16 map (zero padding, always / 9) into float32 `pooled` */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void box_mean(const uint16_t *map, int64_t h, int64_t w, int64_t c, float *pooled) {
    const __m512 ninth = _mm512_set1_ps(1.0f / 9.0f);
    for (int64_t y = 0; y < h; y++) {
        for (int64_t x = 0; x < w; x++) {
            for (int64_t k = 0; k < c; k += 16) {
                int64_t left = c - k;
                __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t dy = -1; dy <= 1; dy++) {
                    if (y + dy < 0 || y + dy >= h) continue;
                    for (int64_t dx = -1; dx <= 1; dx++) {
                        if (x + dx < 0 || x + dx >= w) continue;
                        __m256i raw = _mm256_maskz_loadu_epi16(mask, map + ((y + dy) * w + (x + dx)) * c + k);
                        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
                    }
                }
                _mm512_mask_storeu_ps(pooled + (y * w + x) * c + k, mask, _mm512_mul_ps(sum, ninth));
            }
        }
    }
}

/* torch's source index for align_corners=False: (i + 0.5) * in / out - 0.5, negative -> 0 */
static void bilinear_taps(int64_t out_size, int64_t in_size, int64_t i, int64_t *lower, int64_t *upper, float *weight) {
    float scale = (float)in_size / (float)out_size;
    float source = ((float)i + 0.5f) * scale - 0.5f;
    if (source < 0.0f) source = 0.0f;
    int64_t low = (int64_t)source;
    if (low > in_size - 1) low = in_size - 1;
    *lower = low;
    *upper = low < in_size - 1 ? low + 1 : low;
    *weight = source - (float)low;
}

/* maps[i]: h[i] x w[i] x c[i] bfloat16 (channels-last); out: height x width x sum(c) float32, height
   and width those of the finest map; scratch: room for the largest h x w x c in float32. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
void dc_patch_features(int64_t count, const uint16_t *const *maps, const int64_t *h, const int64_t *w,
                       const int64_t *c, int64_t height, int64_t width, float *scratch, float *out) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) total += c[i];
    int64_t offset = 0;
    for (int64_t i = 0; i < count; i++) {
        box_mean(maps[i], h[i], w[i], c[i], scratch);
        for (int64_t y = 0; y < height; y++) {
            int64_t y0, y1, x0, x1;
            float wy, wx;
            bilinear_taps(height, h[i], y, &y0, &y1, &wy);
            if (h[i] == height) { y0 = y1 = y; wy = 0.0f; }
            for (int64_t x = 0; x < width; x++) {
                bilinear_taps(width, w[i], x, &x0, &x1, &wx);
                if (w[i] == width) { x0 = x1 = x; wx = 0.0f; }
                const float *p00 = scratch + (y0 * w[i] + x0) * c[i], *p01 = scratch + (y0 * w[i] + x1) * c[i];
                const float *p10 = scratch + (y1 * w[i] + x0) * c[i], *p11 = scratch + (y1 * w[i] + x1) * c[i];
                float *target = out + (y * width + x) * total + offset;
                __m512 a = _mm512_set1_ps((1.0f - wy) * (1.0f - wx)), b = _mm512_set1_ps((1.0f - wy) * wx);
                __m512 d = _mm512_set1_ps(wy * (1.0f - wx)), e = _mm512_set1_ps(wy * wx);
                for (int64_t k = 0; k < c[i]; k += 16) {
                    int64_t left = c[i] - k;
                    __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                    __m512 value = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p00 + k), a);
                    value = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p01 + k), b, value);
                    value = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p10 + k), d, value);
                    value = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p11 + k), e, value);
                    _mm512_mask_storeu_ps(target + k, mask, value);
                }
            }
        }
        offset += c[i];
    }
}
