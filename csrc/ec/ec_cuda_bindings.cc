// pybind11 bindings of ckpt._ec_cuda: the codec's kernel for shards in GPU
// memory (docs/INTERNALS.md, "Erasure codec"). Built by the host compiler and
// linked with ec_cuda.o and the static cudart, so importing it needs no GPU.
// Bad arguments raise ckpt.errors.CodecError; CUDA failures ckpt.errors.NativeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ec_cuda.h"

namespace py = pybind11;

namespace {

PyObject* g_codec_error = nullptr;
PyObject* g_native_error = nullptr;

struct ArgFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct CudaFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

PyObject* error_class(const char* name, PyObject* base) {
  try {
    return py::object(py::module_::import("ckpt.errors").attr(name)).release().ptr();
  } catch (py::error_already_set&) {
    PyErr_Clear();
    return PyErr_NewException((std::string("ckpt._ec_cuda.") + name).c_str(), base, nullptr);
  }
}

bool available() {
  int n = 0;
  return ckpt_ec_cuda::device_count(&n) == 0 && n > 0;
}

void dot(py::bytes coefs, int rows, int cols, std::vector<uint64_t> src, std::vector<uint64_t> dst,
         uint64_t nbytes, uint64_t stream, bool accumulate, int device) {
  std::string c = coefs;
  if (rows < 1 || cols < 1 || cols > ckpt_ec_cuda::kMaxCols)
    throw ArgFailure("ec_cuda.dot: rows=" + std::to_string(rows) + ", cols=" + std::to_string(cols) +
                     "; rows must be >= 1 and cols in [1, " + std::to_string(ckpt_ec_cuda::kMaxCols) + "]");
  if (c.size() != size_t(rows) * cols)
    throw ArgFailure("ec_cuda.dot: coefs has " + std::to_string(c.size()) + " bytes; expected rows*cols = " +
                     std::to_string(size_t(rows) * cols));
  if (src.size() != size_t(cols) || dst.size() != size_t(rows))
    throw ArgFailure("ec_cuda.dot: got " + std::to_string(src.size()) + " sources and " +
                     std::to_string(dst.size()) + " destinations; expected cols and rows");
  if (nbytes)
    for (uint64_t p : src)
      if (!p) throw ArgFailure("ec_cuda.dot: a source pointer is null");
  const char* failed = "?";
  int err;
  {
    py::gil_scoped_release nogil;
    err = ckpt_ec_cuda::dot(device, src.data(), cols, dst.data(), rows,
                            reinterpret_cast<const uint8_t*>(c.data()), nbytes, stream, accumulate, &failed);
  }
  if (err)
    throw CudaFailure(std::string("ec_cuda.dot: ") + failed + " failed: " + ckpt_ec_cuda::error_string(err) +
                      " (cudaError " + std::to_string(err) + ")");
}

}  // namespace

PYBIND11_MODULE(_ec_cuda, m) {
  m.doc() = "ckpt Reed-Solomon codec kernel for shards in CUDA device memory (docs/INTERNALS.md)";
  g_codec_error = error_class("CodecError", PyExc_ValueError);
  g_native_error = error_class("NativeError", PyExc_RuntimeError);
  m.attr("CodecError") = py::handle(g_codec_error);
  m.attr("NativeError") = py::handle(g_native_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ArgFailure& e) {
      PyErr_SetString(g_codec_error, e.what());
    } catch (const CudaFailure& e) {
      PyErr_SetString(g_native_error, e.what());
    }
  });
  m.def("available", &available, "Whether a CUDA device is usable.");
  m.def("device_count", [] {
    int n = 0;
    ckpt_ec_cuda::device_count(&n);
    return n;
  });
  m.def("dot", &dot, py::arg("coefs"), py::arg("rows"), py::arg("cols"), py::arg("src_ptrs"),
        py::arg("dst_ptrs"), py::arg("nbytes"), py::arg("stream"), py::arg("accumulate"), py::arg("device"),
        "Enqueue on `stream` of `device`: dst[r] (^= when accumulate) XOR_j coefs[r*cols+j] * src[j], over\n"
        "nbytes of device memory per pointer. Asynchronous; no dst may overlap a src.");
}
