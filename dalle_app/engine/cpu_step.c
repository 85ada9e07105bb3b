/* One decoding step of a DALLE transformer on the CPU, in one call: every layer and the image head.
 *
 * The same arithmetic as dalle_app/models/token_step.py (float32, one token per batch row at position `pos`), without
 * PyTorch's fixed cost per operation. Built by cpu_step.py with the system C compiler (`cc -O3 -march=native`), loaded
 * with ctypes; all state lives in the caller's tensors, so calls from several threads do not interfere.
 *
 * Batch invariance: every output element is computed by the same code in the same order whatever the batch size and
 * whichever thread runs it, so an image does not depend on the other rows of its batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float f) { return (v8){f, f, f, f, f, f, f, f}; }
static inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }

/* [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7], as x86's vhaddps. */
static inline v8 pair_sums(v8 a, v8 b)
{
    return __builtin_shuffle(a, b, (v8i){0, 2, 8, 10, 4, 6, 12, 14}) +
           __builtin_shuffle(a, b, (v8i){1, 3, 9, 11, 5, 7, 13, 15});
}

/* Lane t = the sum of the lanes of a[t]: eight horizontal sums at once. */
static inline v8 lane_sums(const v8 a[8])
{
    v8 g0 = pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3]));
    v8 g1 = pair_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7]));
    return __builtin_shuffle(g0, g1, (v8i){0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(g0, g1, (v8i){4, 5, 6, 7, 12, 13, 14, 15});
}

/* e^x, vectorised (Cephes' expf: range reduction by ln 2 and a degree-6 polynomial, ~1 ulp); x < -87 gives ~0. */
static inline v8 exp8(v8 x)
{
    x = select8(x < splat(-87.f), splat(-87.f), select8(x > splat(88.f), splat(88.f), x));
    v8 n = x * splat(1.44269504088896341f) + splat(0.5f);
    v8 whole = __builtin_convertvector(__builtin_convertvector(n, v8i), v8);  /* toward zero */
    n = whole - select8(whole > n, splat(1.f), splat(0.f));                  /* floor */
    x = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v8 y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * x * x + x + splat(1.f);
    return y * (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
}

/* erf, vectorised (Abramowitz and Stegun 7.1.26, absolute error < 1.5e-7). */
static inline v8 erf8(v8 x)
{
    v8i sign = (v8i)x & (v8i)splat(-0.f);
    v8 a = (v8)((v8i)x & ~(v8i)splat(-0.f));
    v8 t = splat(1.f) / (splat(1.f) + splat(0.3275911f) * a);
    v8 poly = splat(1.061405429f);
    poly = poly * t + splat(-1.453152027f);
    poly = poly * t + splat(1.421413741f);
    poly = poly * t + splat(-0.284496736f);
    poly = poly * t + splat(0.254829592f);
    v8 y = splat(1.f) - poly * t * exp8(-a * a);
    return (v8)((v8i)y | sign);
}
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* Mirrors of the ctypes structures in cpu_step.py. */
typedef struct {
    const float *norm_w, *norm_b;          /* pre-norm (dim) */
    const float *norm_out_w, *norm_out_b;  /* sandwich norm (dim), or NULL */
    const float *scale;                    /* LayerScale (dim) */
    float *history;                        /* token-shift history (batch, max_len + 1, dim), or NULL */
    float eps, eps_out;
} Branch;

typedef struct {
    Branch attn, ff;
    const float *qkv_w;                    /* (3 * heads * dim_head, dim), no bias; this and the other
                                              weights packed in panels (see linear) */
    const float *out_w, *out_b;            /* (dim, heads * dim_head), (dim) */
    const float *in_w, *in_b;              /* (2 * hidden, dim), (2 * hidden) */
    const float *proj_w, *proj_b;          /* (dim, hidden), (dim) */
    const uint8_t *mask;                   /* may-attend (mask_heads, seq, seq) bool, or NULL: every earlier key */
    int64_t mask_heads, mask_seq;
    float *kv;                             /* keys and values (2, batch, heads, max_len, dim_head) */
} Layer;

typedef struct {
    int64_t batch, dim, heads, dim_head, hidden, depth, max_len, n_out, threads;
    const Layer *layers;
    const float *head_norm_w, *head_norm_b;  /* the head's LayerNorm (dim) */
    const float *head_w, *head_b;            /* (n_out, dim) packed, (n_out) */
    float head_eps;
} Model;

/* Weights are packed by cpu_step.py into panels of PANEL outputs: panel p holds w[p*PANEL + j, k] at
 * [p][k][j] (zero past the last output), so a panel is read as one stream and each output is a vector lane. */
#define PANEL 24

/* rows (1..4) rows of x against one panel: acc[r][v] lane j = sum over k, in order, of x[r, k] w[o + 8v + j, k].
 * Inlined with a constant `rows`, the accumulators stay in registers (12 + 3 weights + 1 broadcast). */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t K, const float *panel,
                                                              const float *b, int64_t o, int64_t N, float *y,
                                                              const int rows)
{
    v8 acc[4][3] = {{{0}}};
    for (int64_t k = 0; k < K; k++) {
        const float *pk = panel + k * PANEL;
        v8 w0 = load8(pk), w1 = load8(pk + 8), w2 = load8(pk + 16);
#if defined(__x86_64__)
        __asm__("" : "+x"(w0), "+x"(w1), "+x"(w2));  /* keep them in registers: one load each, not one per row */
#endif
        for (int r = 0; r < rows; r++) {
            v8 xr = splat(x[r * K + k]);
            acc[r][0] += xr * w0; acc[r][1] += xr * w1; acc[r][2] += xr * w2;
        }
    }
    int64_t width = N - o < PANEL ? N - o : PANEL;
    for (int r = 0; r < rows; r++)
        for (int64_t j = 0; j < width; j++)
            y[r * N + o + j] = acc[r][j / 8][j % 8] + (b ? b[o + j] : 0.f);
}

/* y[m, o] = b[o] + sum_k x[m, k] w[o, k] for m < M, o < N, w packed in panels; rows of x and y are K and N apart.
 * Every output is summed in the same order whatever M and the thread, so results do not depend on the batch. */
static void linear(const float *x, int64_t M, int64_t K, const float *packed, const float *b, int64_t N, float *y)
{
    int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const float *panel = packed + p * K * PANEL;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) panel_rows(x + m * K, K, panel, b, p * PANEL, N, y + m * N, 4);
        switch (M - m) {
        case 3: panel_rows(x + m * K, K, panel, b, p * PANEL, N, y + m * N, 3); break;
        case 2: panel_rows(x + m * K, K, panel, b, p * PANEL, N, y + m * N, 2); break;
        case 1: panel_rows(x + m * K, K, panel, b, p * PANEL, N, y + m * N, 1); break;
        }
    }
}

static void layer_norm(const float *x, int64_t dim, const float *w, const float *b, float eps, float *y)
{
    float mean = 0.f, var = 0.f;
    for (int64_t c = 0; c < dim; c++) mean += x[c];
    mean /= (float)dim;
    for (int64_t c = 0; c < dim; c++) { float d = x[c] - mean; var += d * d; }
    float inv = 1.f / sqrtf(var / (float)dim + eps);
    for (int64_t c = 0; c < dim; c++) y[c] = (x[c] - mean) * inv * w[c] + b[c];
}

/* h = shift(norm(x)) for every row; the normalised token is then stored in the history at pos (after the reads, which
 * are of earlier rows or of the zero row). segments: (row, lo, hi) triples, row -1 = the token itself. */
static void branch_input(const Model *m, const Branch *br, const float *x, int64_t pos, const int32_t *segments,
                         int64_t n_segments, float *normed, float *h)
{
    int64_t dim = m->dim, rows = m->max_len + 1;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m->batch; r++) {
        float *nr = normed + r * dim, *hr = h + r * dim;
        layer_norm(x + r * dim, dim, br->norm_w, br->norm_b, br->eps, nr);
        if (!br->history) { memcpy(hr, nr, dim * sizeof(float)); continue; }
        float *hist = br->history + r * rows * dim;
        for (int64_t s = 0; s < n_segments; s++) {
            int32_t src = segments[3 * s], lo = segments[3 * s + 1], hi = segments[3 * s + 2];
            const float *from = src < 0 ? nr : hist + (int64_t)src * dim;
            memcpy(hr + lo, from + lo, (hi - lo) * sizeof(float));
        }
        memcpy(hist + pos * dim, nr, dim * sizeof(float));
    }
}

/* x += scale * norm_out(y), row by row. */
static void branch_output(const Model *m, const Branch *br, float *x, float *y)
{
    int64_t dim = m->dim;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m->batch; r++) {
        float *yr = y + r * dim, *xr = x + r * dim;
        if (br->norm_out_w) layer_norm(yr, dim, br->norm_out_w, br->norm_out_b, br->eps_out, yr);
        for (int64_t c = 0; c < dim; c++) xr[c] += br->scale[c] * yr[c];
    }
}

/* Softmax attention of one query q over keys 0..pos (those `allow` permits; NULL = all) into o, for a head of
 * nv * 8 channels. Inlined with a constant nv, q and the output stay in registers. scores: room for pos + 8. */
static inline __attribute__((always_inline)) void attend_vectors(const float *q, const float *keys,
                                                                  const float *vals, int64_t pos,
                                                                  const uint8_t *allow, float scale, float *scores,
                                                                  float *o, const int nv)
{
    v8 qv[16], ov[16];
    for (int c = 0; c < nv; c++) { qv[c] = load8(q + 8 * c); ov[c] = splat(0.f); }
    int64_t n = pos + 1, j = 0;
    for (; j + 8 <= n; j += 8) {  /* eight keys at a time */
        v8 acc[8];
        for (int t = 0; t < 8; t++) {
            const float *kj = keys + (j + t) * 8 * nv;
            acc[t] = qv[0] * load8(kj);
            for (int c = 1; c < nv; c++) acc[t] += qv[c] * load8(kj + 8 * c);
        }
        store8(scores + j, lane_sums(acc) * splat(scale));
    }
    for (; j < n; j++) {
        const float *kj = keys + j * 8 * nv;
        v8 acc = qv[0] * load8(kj);
        for (int c = 1; c < nv; c++) acc += qv[c] * load8(kj + 8 * c);
        scores[j] = hsum(acc) * scale;
    }
    float best = -INFINITY;
    for (j = 0; j < n; j++) {
        if (allow && !allow[j]) scores[j] = -INFINITY;
        if (scores[j] > best) best = scores[j];
    }
    if (best == -INFINITY) {  /* no key allowed: zeros */
        for (int c = 0; c < nv; c++) store8(o + 8 * c, splat(0.f));
        return;
    }
    for (int64_t j = n; j % 8; j++) scores[j] = -INFINITY;
    v8 total = splat(0.f);
    for (int64_t j = 0; j < n; j += 8) {
        v8 sj = load8(scores + j);
        v8 p = (v8)((v8i)exp8(sj - splat(best)) & (sj > splat(-INFINITY)));  /* masked keys: exactly 0 */
        store8(scores + j, p);
        total += p;
    }
    for (int64_t j = 0; j < n; j++) {
        if (scores[j] == 0.f) continue;
        const float *vj = vals + j * 8 * nv;
        v8 p = splat(scores[j]);
        for (int c = 0; c < nv; c++) ov[c] += p * load8(vj + 8 * c);
    }
    v8 inv = splat(1.f / hsum(total));
    for (int c = 0; c < nv; c++) store8(o + 8 * c, ov[c] * inv);
}

/* The same for any head size, one channel at a time. */
static void attend_scalar(const float *q, const float *keys, const float *vals, int64_t pos, const uint8_t *allow,
                          float scale, float *scores, float *o, int64_t D)
{
    float best = -INFINITY, total = 0.f;
    for (int64_t j = 0; j <= pos; j++) {
        float s = -INFINITY;
        if (!allow || allow[j]) {
            s = 0.f;
            for (int64_t c = 0; c < D; c++) s += q[c] * keys[j * D + c];
            s *= scale;
        }
        scores[j] = s;
        if (s > best) best = s;
    }
    memset(o, 0, D * sizeof(float));
    if (best == -INFINITY) return;
    for (int64_t j = 0; j <= pos; j++) {
        if (scores[j] == -INFINITY) continue;
        float p = expf(scores[j] - best);
        total += p;
        for (int64_t c = 0; c < D; c++) o[c] += p * vals[j * D + c];
    }
    for (int64_t c = 0; c < D; c++) o[c] /= total;
}

/* Rotate (rotary) this token's q, k and v, store k and v in the cache at pos, attend over keys 0..pos. */
static void attend(const Model *m, const Layer *L, float *qkv, int64_t pos, const float *cos, const float *sin,
                   float *out, float *scores_all)
{
    int64_t H = m->heads, D = m->dim_head, B = m->batch, T = m->max_len, inner = H * D;
    float scale = 1.f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t r = bh / H, hd = bh % H;
        float *q = qkv + r * 3 * inner + hd * D, *k = q + inner, *v = k + inner;
        if (cos) {
            for (int part = 0; part < 3; part++) {
                float *t = q + part * inner, tmp[D];
                for (int64_t c = 0; c < D; c++) tmp[c] = t[c] * cos[c] + t[c ^ 1] * sin[c];
                memcpy(t, tmp, D * sizeof(float));
            }
        }
        float *keys = L->kv + ((0 * B + r) * H + hd) * T * D, *vals = L->kv + ((1 * B + r) * H + hd) * T * D;
        memcpy(keys + pos * D, k, D * sizeof(float));
        memcpy(vals + pos * D, v, D * sizeof(float));
        const uint8_t *allow = NULL;
        if (L->mask) allow = L->mask + ((L->mask_heads > 1 ? hd : 0) * L->mask_seq + pos) * L->mask_seq;
        float *scores = scores_all + bh * (T + 8), *o = out + r * inner + hd * D;
        switch (D) {
        case 32: attend_vectors(q, keys, vals, pos, allow, scale, scores, o, 4); break;
        case 64: attend_vectors(q, keys, vals, pos, allow, scale, scores, o, 8); break;
        case 128: attend_vectors(q, keys, vals, pos, allow, scale, scores, o, 16); break;
        default: attend_scalar(q, keys, vals, pos, allow, scale, scores, o, D);
        }
    }
}

/* GEGLU: g[m, c] = u[m, c] * gelu(u[m, hidden + c]), gelu(z) = z (1 + erf(z / sqrt 2)) / 2. */
static void geglu(const Model *m, const float *u, float *g)
{
    int64_t F = m->hidden;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m->batch; r++) {
        const float *ur = u + r * 2 * F, *gate = ur + F;
        float *gr = g + r * F;
        int64_t c = 0;
        for (; c + 8 <= F; c += 8) {
            v8 z = load8(gate + c);
            store8(gr + c, load8(ur + c) * (splat(0.5f) * z * (splat(1.f) + erf8(z * splat(0.70710678118654752f)))));
        }
        for (; c < F; c++) gr[c] = ur[c] * (0.5f * gate[c] * (1.f + erff(gate[c] * 0.70710678118654752f)));
    }
}

/* Run the token x (batch, dim) at position pos through every layer (x is overwritten with the output), then, when
 * logits is not NULL, the head: logits (batch, n_out) = head_w @ norm(x) + head_b.
 * cos, sin: this position's rotary tables (dim_head each, sin signed per pair), or NULL without rotary.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int dalle_step(const Model *m, float *x, int64_t pos, const float *cos, const float *sin, const int32_t *segments,
               int64_t n_segments, float *logits)
{
    int64_t B = m->batch, dim = m->dim, inner = m->heads * m->dim_head, F = m->hidden;
    int64_t widest = 3 * inner > 2 * F ? 3 * inner : 2 * F;
    if (widest < dim) widest = dim;
    size_t floats = (size_t)B * (3 * dim + widest + inner + F) + (size_t)B * m->heads * (m->max_len + 8);
    float *work = malloc(floats * sizeof(float));
    if (!work) return -1;
    float *normed = work, *h = normed + B * dim, *y = h + B * dim, *wide = y + B * dim;
    float *att = wide + B * widest, *gated = att + B * inner, *scores = gated + B * F;

#pragma omp parallel num_threads((int)m->threads)
    {
        for (int64_t i = 0; i < m->depth; i++) {
            const Layer *L = &m->layers[i];
            branch_input(m, &L->attn, x, pos, segments, n_segments, normed, h);
            linear(h, B, dim, L->qkv_w, NULL, 3 * inner, wide);
            attend(m, L, wide, pos, cos, sin, att, scores);
            linear(att, B, inner, L->out_w, L->out_b, dim, y);
            branch_output(m, &L->attn, x, y);
            branch_input(m, &L->ff, x, pos, segments, n_segments, normed, h);
            linear(h, B, dim, L->in_w, L->in_b, 2 * F, wide);
            geglu(m, wide, gated);
            linear(gated, B, F, L->proj_w, L->proj_b, dim, y);
            branch_output(m, &L->ff, x, y);
        }
        if (logits) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < B; r++) layer_norm(x + r * dim, dim, m->head_norm_w, m->head_norm_b, m->head_eps,
                                                       h + r * dim);
            linear(h, B, dim, m->head_w, m->head_b, m->n_out, logits);
        }
    }
    free(work);
    return 0;
}

/* The engine's counter-based noise (sampling.py): uniform in (0, 1) from (seed, position, token id). Signed 64-bit
 * arithmetic that wraps, as PyTorch's int64 tensors do. */
#define MASK62 ((int64_t)((1ULL << 62) - 1))
static inline int64_t wrap_mul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }
static inline int64_t mix(int64_t x)
{
    x = wrap_mul(x ^ (x >> 31), 0x3F58476D1CE4E5B9LL) & MASK62;
    x = wrap_mul(x ^ (x >> 29), 0x14D049BB133111EBLL) & MASK62;
    return x ^ (x >> 32);
}
static inline float uniform_noise(int64_t seed, int64_t position, int64_t id)
{
    int64_t x = (int64_t)((uint64_t)wrap_mul(seed, 0x1E3779B97F4A7C15LL) +
                          (uint64_t)mix((int64_t)((uint64_t)wrap_mul(position, 0x3F58476D1CE4E5B9LL) + id + 1))) & MASK62;
    x = mix(x);
    return ((float)((x >> 38) & 0xFFFFFF) + 0.5f) / (float)(1 << 24);
}

/* The k-th largest of v[0..n) (v is reordered), by quickselect. */
static float kth_largest(float *v, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = v[(lo + hi) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) { float t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return v[want];
}

/* One token per image row from logits (rows or, guided, 2 * rows, vocab): classifier-free guidance
 * null + (cond - null) * cond_scale, then exact sampling from softmax(top-k(logits) / temperature) by Gumbel-max
 * with the engine's noise: the same rule as sampling.sample_plain. top_k <= 0 or >= vocab: no filter. */
__attribute__((optimize("fp-contract=off")))  /* round as PyTorch's separate multiply and add do */
int dalle_sample(const float *logits, int64_t rows, int64_t vocab, int guided, float cond_scale, float temperature,
                 int64_t top_k, const int64_t *seeds, int64_t position, int64_t *out)
{
    float *row = malloc(2 * vocab * sizeof(float));
    if (!row) return -1;
    float *scratch = row + vocab;
    for (int64_t r = 0; r < rows; r++) {
        const float *cond = logits + r * vocab, *null = logits + (rows + r) * vocab;
        for (int64_t v = 0; v < vocab; v++) row[v] = guided ? null[v] + (cond[v] - null[v]) * cond_scale : cond[v];
        float threshold = -INFINITY;
        if (top_k > 0 && top_k < vocab) {
            memcpy(scratch, row, vocab * sizeof(float));
            threshold = kth_largest(scratch, vocab, top_k);
        }
        int64_t best = 0;
        float best_score = -INFINITY;
        for (int64_t v = 0; v < vocab; v++) {
            if (row[v] < threshold) continue;
            float score = row[v] / temperature - logf(-logf(uniform_noise(seeds[r], position, v)));
            if (score > best_score) { best_score = score; best = v; }
        }
        out[r] = best;
    }
    free(row);
    return 0;
}

/* The panel width the weights must be packed with. */
int dalle_panel_width(void) { return PANEL; }
