// Golden vectors of llama.cpp's real CPU matmul path and activation quantizers, for SmolDesk's
// kernel tests. Format: tests/fixtures/kernels/README.md. Built by scripts/llamacpp/build.sh.
//
//   kernel-golden OUT_DIR [THREADS]
//
// Each matmul is a one-node ggml graph computed by the CPU backend, with the weight placed in the
// buffer type llama.cpp's model loader would choose (the first CPU "extra" buffer type, such as
// CPU_REPACK, that supports the MUL_MAT; otherwise the plain CPU buffer).

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// splitmix64: a fixed, portable random stream.
struct Rng {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    double uniform() { return (double) (next() >> 11) * (1.0 / 9007199254740992.0); }
    double normal() {
        double u1 = uniform(), u2 = uniform();
        if (u1 < 1e-300) u1 = 1e-300;
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
    // Normal with about 1% outliers of 8..24 times the size.
    float normal_with_outliers() {
        double v = normal();
        if (uniform() < 0.01) v *= 8.0 + 16.0 * uniform();
        return (float) v;
    }
};

[[noreturn]] void die(const std::string & msg) {
    std::fprintf(stderr, "kernel-golden: %s\n", msg.c_str());
    std::exit(1);
}

struct Writer {
    FILE * f;
    explicit Writer(const std::string & path) : f(std::fopen(path.c_str(), "wb")) {
        if (!f) die("cannot write " + path);
    }
    ~Writer() { std::fclose(f); }
    void bytes(const void * p, size_t n) {
        if (n && std::fwrite(p, 1, n, f) != n) die("short write");
    }
    void u32(uint32_t v) { bytes(&v, 4); }
    void u64(uint64_t v) { bytes(&v, 8); }
    void f32s(const std::vector<float> & v) { bytes(v.data(), v.size() * sizeof(float)); }
};

// Activation rows: random with outliers; row 2 tiny; row 5 with a run of zeros.
std::vector<float> make_inputs(Rng & rng, int rows, int k) {
    std::vector<float> x((size_t) rows * k);
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < k; i++) {
            float v = rng.normal_with_outliers();
            if (r == 2) v *= 1e-3f;
            if (r == 5 && i >= k / 4 && i < k / 2) v = 0.0f;
            x[(size_t) r * k + i] = v;
        }
    }
    return x;
}

// Random weights (per-row scale varies) quantized with ggml's own quantizer, GGUF layout.
std::vector<uint8_t> make_weights(Rng & rng, ggml_type type, int n, int k) {
    std::vector<float> w((size_t) n * k);
    for (int r = 0; r < n; r++) {
        const float row_scale = 0.02f * (float) (0.5 + rng.uniform());
        for (int i = 0; i < k; i++) w[(size_t) r * k + i] = row_scale * rng.normal_with_outliers();
    }
    std::vector<uint8_t> q(ggml_row_size(type, k) * n);
    const size_t written = ggml_quantize_chunk(type, w.data(), q.data(), 0, n, k, nullptr);
    if (written != q.size()) die("ggml_quantize_chunk wrote an unexpected size");
    return q;
}

// The buffer type llama.cpp's loader (select_weight_buft) picks for a MUL_MAT weight on the CPU.
ggml_backend_buffer_type_t weight_buft(ggml_backend_dev_t dev, ggml_type type, int n, int k) {
    auto reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        reg, "ggml_backend_dev_get_extra_bufts");
    ggml_init_params params = {ggml_tensor_overhead() * 8, nullptr, true};
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * w = ggml_new_tensor_2d(ctx, type, k, n);
    ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, 512);
    ggml_tensor * op = ggml_mul_mat(ctx, w, b);
    ggml_backend_buffer_type_t chosen = ggml_backend_cpu_buffer_type();
    for (auto * buft = get_extra ? get_extra(dev) : nullptr; buft && *buft; ++buft) {
        w->buffer = ggml_backend_buft_alloc_buffer(*buft, 0);
        const bool ok = ggml_backend_dev_supports_op(dev, op);
        ggml_backend_buffer_free(w->buffer);
        w->buffer = nullptr;
        if (ok) {
            chosen = *buft;
            break;
        }
    }
    ggml_free(ctx);
    return chosen;
}

// y = W x for the first m rows of x, through a ggml graph on the CPU backend.
std::vector<float> run_matmul(ggml_backend_t backend, ggml_backend_buffer_type_t wbuft, ggml_type type,
                              int n, int k, const std::vector<uint8_t> & wbytes,
                              const std::vector<float> & x, int m) {
    ggml_init_params params = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true};
    ggml_context * ctx_w = ggml_init(params);
    ggml_tensor * w = ggml_new_tensor_2d(ctx_w, type, k, n);
    ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, wbuft);
    if (!buf_w) die("cannot allocate the weight buffer");
    ggml_backend_buffer_set_usage(buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    ggml_backend_tensor_set(w, wbytes.data(), 0, wbytes.size());

    ggml_context * ctx = ggml_init(params);
    ggml_tensor * xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, m);
    ggml_tensor * y = ggml_mul_mat(ctx, w, xt);
    ggml_cgraph * graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
    if (!buf) die("cannot allocate the activation buffer");
    ggml_backend_tensor_set(xt, x.data(), 0, (size_t) m * k * sizeof(float));
    if (ggml_backend_graph_compute(backend, graph) != GGML_STATUS_SUCCESS) die("graph compute failed");
    std::vector<float> out((size_t) m * n);
    ggml_backend_tensor_get(y, out.data(), 0, out.size() * sizeof(float));

    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    ggml_backend_buffer_free(buf_w);
    ggml_free(ctx_w);
    return out;
}

// W (dequantized with ggml's to_float) times x in double precision: a sanity bound, not a target.
std::vector<double> reference_matmul(ggml_type type, int n, int k, const std::vector<uint8_t> & wbytes,
                                     const std::vector<float> & x, int m) {
    std::vector<float> w((size_t) n * k);
    const size_t row_bytes = ggml_row_size(type, k);
    const auto to_float = ggml_get_type_traits(type)->to_float;
    if (type == GGML_TYPE_F32) {
        std::memcpy(w.data(), wbytes.data(), wbytes.size());
    } else {
        for (int r = 0; r < n; r++) to_float(wbytes.data() + r * row_bytes, w.data() + (size_t) r * k, k);
    }
    std::vector<double> y((size_t) m * n);
    for (int j = 0; j < m; j++)
        for (int i = 0; i < n; i++) {
            double acc = 0.0;
            for (int e = 0; e < k; e++) acc += (double) w[(size_t) i * k + e] * x[(size_t) j * k + e];
            y[(size_t) j * n + i] = acc;
        }
    return y;
}

// The largest |value| in the output row holding element i, floored to avoid dividing by zero.
double ref_scale(const std::vector<double> & ref, size_t i, int n) {
    const size_t row = i / n;
    double top = 1e-30;
    for (int e = 0; e < n; e++) top = std::max(top, std::fabs(ref[row * n + e]));
    return top;
}

struct MatmulCase {
    ggml_type type;
    int n, k;
};

void write_matmul(const std::string & dir, ggml_backend_t backend, ggml_backend_dev_t dev, int threads,
                  const MatmulCase & c, uint64_t seed) {
    static const int ms[] = {1, 2, 3, 4, 5, 7, 8, 16, 33};
    const int n_cases = sizeof(ms) / sizeof(ms[0]);
    const int m_max = ms[n_cases - 1];
    Rng rng{seed};
    const std::vector<uint8_t> wbytes = make_weights(rng, c.type, c.n, c.k);
    const std::vector<float> x = make_inputs(rng, m_max, c.k);
    ggml_backend_buffer_type_t wbuft = weight_buft(dev, c.type, c.n, c.k);
    const bool repacked = wbuft != ggml_backend_cpu_buffer_type();

    const std::string name = std::string("mm-") + ggml_type_name(c.type) + "-n" + std::to_string(c.n) +
                             "-k" + std::to_string(c.k) + ".bin";
    Writer out(dir + "/" + name);
    out.bytes("SDMM", 4);
    out.u32(1);
    out.u32((uint32_t) c.type);
    out.u32((uint32_t) c.n);
    out.u32((uint32_t) c.k);
    out.u32((uint32_t) m_max);
    out.u32((uint32_t) n_cases);
    out.u32((uint32_t) threads);
    out.u32(repacked ? 1 : 0);
    out.u64(wbytes.size());
    out.bytes(wbytes.data(), wbytes.size());
    out.f32s(x);
    const std::vector<double> ref = reference_matmul(c.type, c.n, c.k, wbytes, x, m_max);
    double worst = 0.0;
    for (int m : ms) {
        const std::vector<float> y = run_matmul(backend, wbuft, c.type, c.n, c.k, wbytes, x, m);
        for (size_t i = 0; i < y.size(); i++) worst = std::max(worst, std::fabs(y[i] - ref[i]) / ref_scale(ref, i, c.n));
        out.u32((uint32_t) m);
        out.f32s(y);
    }
    std::printf("%s: %s (%s), max |y - dequantized W . x| / row max = %.2e\n", name.c_str(),
                ggml_backend_buft_name(wbuft), repacked ? "repacked" : "plain", worst);
}

// Rows that probe the activation quantizers' rounding and edge cases.
std::vector<float> quantizer_rows(Rng & rng, int k, int & rows) {
    std::vector<std::vector<float>> r;
    for (int i = 0; i < 6; i++) {
        std::vector<float> v(k);
        for (auto & e : v) e = rng.normal_with_outliers();
        r.push_back(v);
    }
    r.push_back(std::vector<float>(k, 0.0f));
    r.push_back(std::vector<float>(k, 0.75f));
    {  // exact ties: block max 127 so that iscale = 1 and x = j + 0.5 lands on a .5
        std::vector<float> v(k);
        for (int i = 0; i < k; i++) v[i] = (i % 32 == 0) ? 127.0f : (float) ((i * 7) % 254 - 127) + 0.5f;
        for (auto & e : v) if (e > 127.0f) e = 127.0f;
        r.push_back(v);
    }
    {  // ties after scaling by a non-power-of-two iscale
        std::vector<float> v(k);
        for (int i = 0; i < k; i++) v[i] = (i % 32 == 0) ? 3.0f : 3.0f * ((float) (i % 64) - 31.5f) / 127.0f;
        r.push_back(v);
    }
    {
        std::vector<float> v(k);
        for (int i = 0; i < k; i++) v[i] = (float) (rng.normal() * 1e-30);
        r.push_back(v);
    }
    {
        std::vector<float> v(k);
        for (int i = 0; i < k; i++) v[i] = (float) (rng.normal() * 1e30);
        r.push_back(v);
    }
    {  // alternating signs, the largest magnitude negative
        std::vector<float> v(k);
        for (int i = 0; i < k; i++) v[i] = (i % 2 ? -1.0f : 1.0f) * (float) (1 + i % 13) / 13.0f;
        for (int i = 5; i < k; i += 32) v[i] = -1.5f;
        r.push_back(v);
    }
    for (int i = 0; i < 3; i++) {  // uniform in [-1, 1): many values near rounding boundaries
        std::vector<float> v(k);
        for (auto & e : v) e = (float) (2.0 * rng.uniform() - 1.0);
        r.push_back(v);
    }
    rows = (int) r.size();
    std::vector<float> flat;
    for (auto & v : r) flat.insert(flat.end(), v.begin(), v.end());
    return flat;
}

void write_quantizer(const std::string & dir, ggml_type type, int k, uint64_t seed) {
    Rng rng{seed};
    int rows = 0;
    const std::vector<float> x = quantizer_rows(rng, k, rows);
    const size_t row_bytes = ggml_row_size(type, k);
    std::vector<uint8_t> q(row_bytes * rows);
    const auto from_float = ggml_get_type_traits_cpu(type)->from_float;
    if (!from_float) die(std::string("no from_float for ") + ggml_type_name(type));
    for (int r = 0; r < rows; r++) from_float(x.data() + (size_t) r * k, q.data() + r * row_bytes, k);

    const std::string name = std::string("q-") + ggml_type_name(type) + ".bin";
    Writer out(dir + "/" + name);
    out.bytes("SDQZ", 4);
    out.u32(1);
    out.u32((uint32_t) type);
    out.u32((uint32_t) rows);
    out.u32((uint32_t) k);
    out.u32((uint32_t) row_bytes);
    out.f32s(x);
    out.bytes(q.data(), q.size());
    std::printf("%s: %d rows of %d\n", name.c_str(), rows, k);
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 2) die("usage: kernel-golden OUT_DIR [THREADS]");
    const std::string dir = argv[1];
    const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
    ggml_cpu_init();
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) die("no CPU device");
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    ggml_backend_cpu_set_n_threads(backend, threads);

    const MatmulCase cases[] = {
        {GGML_TYPE_Q4_K, 64, 512}, {GGML_TYPE_Q4_K, 64, 1536}, {GGML_TYPE_Q6_K, 64, 512},
        {GGML_TYPE_Q6_K, 40, 512}, {GGML_TYPE_Q8_0, 64, 576},  {GGML_TYPE_Q5_0, 64, 576},
        {GGML_TYPE_Q4_1, 64, 576}, {GGML_TYPE_F32, 64, 512},   {GGML_TYPE_F16, 64, 512},
        {GGML_TYPE_Q6_K, 64, 1536},  // appended, so that the earlier cases keep their seeds
        {GGML_TYPE_Q4_0, 64, 576},  {GGML_TYPE_Q5_K, 64, 512}, {GGML_TYPE_Q5_K, 40, 1536},
        {GGML_TYPE_Q5_1, 64, 576},  {GGML_TYPE_Q3_K, 64, 512}, {GGML_TYPE_Q3_K, 40, 1536},
        {GGML_TYPE_Q2_K, 64, 512},  {GGML_TYPE_Q2_K, 40, 1536},
    };
    uint64_t seed = 1;
    for (const auto & c : cases) write_matmul(dir, backend, dev, threads, c, seed++);
    write_quantizer(dir, GGML_TYPE_Q8_K, 512, 101);
    write_quantizer(dir, GGML_TYPE_Q8_0, 576, 102);
    write_quantizer(dir, GGML_TYPE_Q8_1, 576, 103);

    ggml_backend_free(backend);
    return 0;
}
