// Replays a llama-quantize run with ggml-base alone (no CPU backend, no libllama), so that a fresh
// CI machine can make the k-quant test model in about a minute instead of building all of
// llama.cpp. The tensor order and types come from a manifest written from llama-quantize's own
// output; the quantization is the same ggml_quantize_chunk call (no importance matrix), so the file
// is byte-identical (scripts/fetch-test-model.sh checks the SHA-256).
//
//   requant SRC.gguf MANIFEST DST.gguf FILE_TYPE
//
// MANIFEST: one line per output tensor, in output order: `name ggml_type_id`.

#include "ggml.h"
#include "gguf.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string & msg) {
    std::fprintf(stderr, "requant: %s\n", msg.c_str());
    std::exit(1);
}

// The tensor's data converted to `type`, as llama-quantize does: dequantize to f32, then quantize.
std::vector<uint8_t> convert(const ggml_tensor * t, ggml_type type) {
    const int64_t n_per_row = t->ne[0];
    const int64_t rows = ggml_nrows(t);
    if (t->type == type) {
        const auto * p = (const uint8_t *) t->data;
        return std::vector<uint8_t>(p, p + ggml_nbytes(t));
    }
    std::vector<float> f32((size_t) (n_per_row * rows));
    if (t->type == GGML_TYPE_F32) {
        std::copy((const float *) t->data, (const float *) t->data + f32.size(), f32.begin());
    } else {
        const auto to_float = ggml_get_type_traits(t->type)->to_float;
        if (!to_float) die(std::string("cannot dequantize ") + ggml_type_name(t->type));
        to_float(t->data, f32.data(), (int64_t) f32.size());
    }
    std::vector<uint8_t> out(ggml_row_size(type, n_per_row) * rows);
    const size_t written = ggml_quantize_chunk(type, f32.data(), out.data(), 0, rows, n_per_row, nullptr);
    if (written != out.size()) die(std::string("unexpected size quantizing ") + ggml_get_name(t));
    return out;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc != 5) die("usage: requant SRC.gguf MANIFEST DST.gguf FILE_TYPE");
    ggml_context * data = nullptr;
    gguf_init_params params = {false, &data};
    gguf_context * src = gguf_init_from_file(argv[1], params);
    if (!src) die(std::string("cannot read ") + argv[1]);

    gguf_context * out = gguf_init_empty();
    gguf_set_kv(out, src);
    gguf_set_val_u32(out, "general.quantization_version", GGML_QNT_VERSION);
    gguf_set_val_u32(out, "general.file_type", (uint32_t) std::atoi(argv[4]));
    gguf_remove_key(out, "split.no");
    gguf_remove_key(out, "split.count");

    std::ifstream manifest(argv[2]);
    if (!manifest) die(std::string("cannot read ") + argv[2]);
    std::vector<std::vector<uint8_t>> buffers;  // the new data, alive until the file is written
    std::string name;
    int type = 0;
    while (manifest >> name >> type) {
        const ggml_tensor * t = ggml_get_tensor(data, name.c_str());
        if (!t) die("no tensor " + name + " in the source");
        gguf_add_tensor(out, t);
        buffers.push_back(convert(t, (ggml_type) type));
        gguf_set_tensor_type(out, name.c_str(), (ggml_type) type);
        gguf_set_tensor_data(out, name.c_str(), buffers.back().data());
    }
    if (buffers.size() != (size_t) gguf_get_n_tensors(src)) die("the manifest does not list every tensor");
    if (!gguf_write_to_file(out, argv[3], false)) die(std::string("cannot write ") + argv[3]);
    gguf_free(out);
    gguf_free(src);
    ggml_free(data);
    return 0;
}
