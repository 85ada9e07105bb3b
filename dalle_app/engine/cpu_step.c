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
    const float *qkv_w;                    /* (3 * heads * dim_head, dim), no bias */
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
    const float *head_w, *head_b;            /* (n_out, dim), (n_out) */
    float head_eps;
} Model;

/* y[m, o] = b[o] + sum_k x[m, k] w[o, k] for m < M, o < N; rows of x and y are K and N apart.
 * Two outputs at a time against four rows at a time: each weight row is read from memory once per call. */
static void linear(const float *x, int64_t M, int64_t K, const float *w, const float *b, int64_t N, float *y)
{
    int64_t pairs = (N + 1) / 2;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; p++) {
        int64_t o = 2 * p, two = o + 1 < N;
        const float *w0 = w + o * K, *w1 = two ? w0 + K : w0;
        float b0 = b ? b[o] : 0.f, b1 = b && two ? b[o + 1] : 0.f;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) {
                v8 u = load8(w0 + k), v = load8(w1 + k), t;
                t = load8(x0 + k); a0 += u * t; c0 += v * t;
                t = load8(x1 + k); a1 += u * t; c1 += v * t;
                t = load8(x2 + k); a2 += u * t; c2 += v * t;
                t = load8(x3 + k); a3 += u * t; c3 += v * t;
            }
            float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(c0), hsum(c1), hsum(c2), hsum(c3)};
            for (; k < K; k++) {
                s[0] += w0[k] * x0[k]; s[1] += w0[k] * x1[k]; s[2] += w0[k] * x2[k]; s[3] += w0[k] * x3[k];
                s[4] += w1[k] * x0[k]; s[5] += w1[k] * x1[k]; s[6] += w1[k] * x2[k]; s[7] += w1[k] * x3[k];
            }
            for (int r = 0; r < 4; r++) {
                y[(m + r) * N + o] = s[r] + b0;
                if (two) y[(m + r) * N + o + 1] = s[4 + r] + b1;
            }
        }
        for (; m < M; m++) {
            const float *x0 = x + m * K;
            v8 a0 = {0}, c0 = {0};
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) {
                v8 t = load8(x0 + k);
                a0 += load8(w0 + k) * t; c0 += load8(w1 + k) * t;
            }
            float s0 = hsum(a0), s1 = hsum(c0);
            for (; k < K; k++) { s0 += w0[k] * x0[k]; s1 += w1[k] * x0[k]; }
            y[m * N + o] = s0 + b0;
            if (two) y[m * N + o + 1] = s1 + b1;
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
        float *scores = scores_all + bh * (T + 1), best = -INFINITY;
        for (int64_t j = 0; j <= pos; j++) {
            if (allow && !allow[j]) { scores[j] = -INFINITY; continue; }
            const float *kj = keys + j * D;
            float s;
            if (D % 8 == 0) {
                v8 acc = {0};
                for (int64_t c = 0; c < D; c += 8) acc += load8(q + c) * load8(kj + c);
                s = hsum(acc);
            } else {
                s = 0.f;
                for (int64_t c = 0; c < D; c++) s += q[c] * kj[c];
            }
            scores[j] = s * scale;
            if (scores[j] > best) best = scores[j];
        }
        float *o = out + r * inner + hd * D, total = 0.f;
        memset(o, 0, D * sizeof(float));
        if (best == -INFINITY) continue;  /* no key allowed: zeros */
        for (int64_t j = 0; j <= pos; j++) {
            if (scores[j] == -INFINITY) continue;
            float p = expf(scores[j] - best);
            total += p;
            const float *vj = vals + j * D;
            if (D % 8 == 0) {
                v8 pv = {p, p, p, p, p, p, p, p};
                for (int64_t c = 0; c < D; c += 8) store8(o + c, load8(o + c) + pv * load8(vj + c));
            } else {
                for (int64_t c = 0; c < D; c++) o[c] += p * vj[c];
            }
        }
        for (int64_t c = 0; c < D; c++) o[c] /= total;
    }
}

/* GEGLU: g[m, c] = u[m, c] * gelu(u[m, hidden + c]), exact (erf) gelu. */
static void geglu(const Model *m, const float *u, float *g)
{
    int64_t F = m->hidden;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m->batch; r++)
        for (int64_t c = 0; c < F; c++) {
            float gate = u[r * 2 * F + F + c];
            g[r * F + c] = u[r * 2 * F + c] * (0.5f * gate * (1.f + erff(gate * 0.70710678118654752f)));
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
    size_t floats = (size_t)B * (3 * dim + widest + inner + F) + (size_t)B * m->heads * (m->max_len + 1);
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
