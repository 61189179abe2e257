// pybind11 bindings of ckpt._ec, the Reed-Solomon codec's native core
// (docs/INTERNALS.md, "Erasure codec"). Buffers come in through the buffer
// protocol (zero copy); the byte work runs with the GIL released. Failures
// raise ckpt._ec.CodecError, the same class as ckpt.errors.CodecError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu.h"
#include "gf.h"
#include "plan.h"

namespace py = pybind11;
using namespace ckpt_ec;

namespace {

PyObject* g_codec_error = nullptr;

struct CodecFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& msg) { throw CodecFailure(msg); }

std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

// Bytes of a contiguous buffer (bytes, bytearray, numpy...) copied out.
std::vector<uint8_t> bytes_of(py::handle obj, const std::string& what) {
  Py_buffer v;
  if (PyObject_GetBuffer(obj.ptr(), &v, PyBUF_SIMPLE) != 0) {
    PyErr_Clear();
    fail(what + " must be a bytes-like object, got " + type_name(obj.ptr()));
  }
  std::vector<uint8_t> out(static_cast<uint8_t*>(v.buf), static_cast<uint8_t*>(v.buf) + v.len);
  PyBuffer_Release(&v);
  return out;
}

void check_km(int k, int m, const std::string& call) {
  if (k < 1 || m < 1)
    fail(call + ": k=" + std::to_string(k) + ", m=" + std::to_string(m) +
         "; both must be at least 1");
  if (k + m > 256)
    fail(call + ": k + m = " + std::to_string(k + m) +
         " shards; GF(2^8) codes have at most 256 (use fewer or split the group)");
}

std::vector<uint8_t> matrix_of(py::handle obj, int k, int m, const std::string& call) {
  std::vector<uint8_t> c = bytes_of(obj, call + ": matrix");
  if (c.size() != size_t(k) * m)
    fail(call + ": matrix has " + std::to_string(c.size()) + " bytes; expected m*k = " +
         std::to_string(size_t(k) * m) + " (m rows of k coefficients, row-major)");
  return c;
}

// Holds Py_buffer views for the length of one call.
class Views {
 public:
  explicit Views(size_t n) { views_.reserve(n); }  // get() hands out references: no reallocation
  ~Views() {
    for (Py_buffer& v : views_) PyBuffer_Release(&v);
  }
  // A C-contiguous (and, when asked, writable) buffer; label() names it in errors.
  template <class Label>
  const Py_buffer& get(PyObject* obj, bool writable, const Label& label) {
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) == 0) {
      views_.push_back(v);
      return views_.back();
    }
    PyErr_Clear();
    if (!PyObject_CheckBuffer(obj))
      fail(label() + " is a " + type_name(obj) +
           ", not a bytes-like buffer; pass bytes, bytearray, memoryview, a numpy array or a CPU tensor");
    if (writable && PyObject_GetBuffer(obj, &v, PyBUF_SIMPLE) == 0) {
      PyBuffer_Release(&v);
      fail(label() + " is read-only; outputs must be writable (bytearray, numpy array, writable memoryview)");
    }
    fail(label() + " is not a C-contiguous buffer; pass a contiguous one (e.g. numpy.ascontiguousarray)");
  }

 private:
  std::vector<Py_buffer> views_;
};

// Names input j in errors: labels[j] ("shard <n>" for an int), else "<fallback> <j>".
std::string label_of(py::handle labels, size_t i, const char* fallback) {
  if (labels.is_none()) return std::string(fallback) + " " + std::to_string(i);
  py::object item = py::reinterpret_borrow<py::sequence>(labels)[i];
  if (PyLong_Check(item.ptr())) return "shard " + std::string(py::str(item));
  return py::str(item);
}

// A list or tuple as is; any other sequence copied into a list. `what()` names it in the error.
template <class What>
py::object fast_sequence(PyObject* obj, const What& what) {
  PyObject* f = PySequence_Fast(obj, "");
  if (!f) {
    PyErr_Clear();
    fail(what() + " must be a sequence of buffers, got " + type_name(obj));
  }
  return py::reinterpret_steal<py::object>(f);
}

// A str argument as UTF-8 (errors only); `fallback` when it is None or not a str.
std::string str_of(PyObject* obj, const char* fallback) {
  if (obj == nullptr || !PyUnicode_Check(obj)) return fallback;
  const char* s = PyUnicode_AsUTF8(obj);
  if (s == nullptr) {
    PyErr_Clear();
    return fallback;
  }
  return s;
}

bool overlaps(const uint8_t* a, const uint8_t* b, size_t n) { return a < b + n && b < a + n; }

class PyPlan {
 public:
  PyPlan(py::handle coefs, int rows, int cols, const std::string& isa) {
    if (rows < 1 || cols < 1 || rows > 256 || cols > 256)
      fail("Plan: rows=" + std::to_string(rows) + ", cols=" + std::to_string(cols) +
           "; each must be between 1 and 256");
    std::vector<uint8_t> c = bytes_of(coefs, "Plan: coefs");
    if (c.size() != size_t(rows) * cols)
      fail("Plan: coefs has " + std::to_string(c.size()) + " bytes; expected rows*cols = " +
           std::to_string(size_t(rows) * cols));
    int level = isa_from_name(isa.c_str());
    const IsaKernels* kern = level >= 0 ? kernels_for(level) : nullptr;
    if (!kern) fail("Plan: kernel level '" + isa + "' is not usable here; available: " + available_str());
    plan_ = std::make_unique<Plan>(c.data(), rows, cols, kern);
  }

  static std::string available_str() {
    std::string s;
    for (int i = 0; i < kNumIsa; i++)
      if (kernels_for(i)) s += (s.empty() ? "" : ", ") + std::string(isa_name(i));
    return s;
  }

  // dst[r] (^)= XOR_j coefs[r][j] * src[j]. Returns the shard length. `call`, `src_labels`
  // and `dst_label` only name things in errors, so they are read only when one is raised.
  size_t apply(PyObject* src_seq, PyObject* dst_seq, bool accumulate, int threads, PyObject* call_obj,
               py::handle src_labels, PyObject* dst_label_obj) {
    auto call = [&] { return str_of(call_obj, "Plan.apply"); };
    auto dst_label = [&] { return str_of(dst_label_obj, "out"); };
    py::object srcs = fast_sequence(src_seq, [&] { return call() + ": the input shards"; });
    py::object dsts = fast_sequence(dst_seq, [&] { return call() + ": " + dst_label(); });
    const size_t ns = size_t(PySequence_Fast_GET_SIZE(srcs.ptr()));
    const size_t nd = size_t(PySequence_Fast_GET_SIZE(dsts.ptr()));
    if (ns != size_t(plan_->cols()))
      fail(call() + ": got " + std::to_string(ns) + " input shards; expected " + std::to_string(plan_->cols()));
    if (nd != size_t(plan_->rows()))
      fail(call() + ": " + dst_label() + " has " + std::to_string(nd) + " buffers; expected " +
           std::to_string(plan_->rows()));
    if (threads < 1) fail(call() + ": threads must be >= 1, got " + std::to_string(threads));
    Views views(ns + nd);
    const uint8_t* src[256];
    uint8_t* dst[256];
    size_t len = 0;
    for (size_t j = 0; j < ns; j++) {
      auto label = [&] { return call() + ": " + label_of(src_labels, j, "shard"); };
      const Py_buffer& v = views.get(PySequence_Fast_GET_ITEM(srcs.ptr(), j), false, label);
      src[j] = static_cast<const uint8_t*>(v.buf);
      if (j == 0) {
        len = size_t(v.len);
      } else if (size_t(v.len) != len) {
        fail(call() + ": " + label_of(src_labels, j, "shard") + " has " + std::to_string(v.len) +
             " bytes but " + label_of(src_labels, 0, "shard") + " has " + std::to_string(len) +
             "; all shards must have the same length (pad the last one)");
      }
    }
    for (size_t r = 0; r < nd; r++) {
      auto label = [&] { return call() + ": " + dst_label() + "[" + std::to_string(r) + "]"; };
      const Py_buffer& v = views.get(PySequence_Fast_GET_ITEM(dsts.ptr(), r), true, label);
      dst[r] = static_cast<uint8_t*>(v.buf);
      if (size_t(v.len) != len)
        fail(label() + " has " + std::to_string(v.len) + " bytes; expected " + std::to_string(len) +
             " (the shard length)");
    }
    if (len) {
      for (size_t r = 0; r < nd; r++) {
        for (size_t j = 0; j < ns; j++)
          if (overlaps(dst[r], src[j], len))
            fail(call() + ": " + dst_label() + "[" + std::to_string(r) + "] shares memory with " +
                 label_of(src_labels, j, "shard") + "; outputs must not overlap the inputs");
        for (size_t q = 0; q < r; q++)
          if (overlaps(dst[r], dst[q], len))
            fail(call() + ": " + dst_label() + "[" + std::to_string(r) + "] shares memory with " +
                 dst_label() + "[" + std::to_string(q) + "]; outputs must not overlap each other");
      }
      py::gil_scoped_release nogil;
      plan_->apply(src, dst, len, accumulate, threads);
    }
    return len;
  }

  const Plan& plan() const { return *plan_; }

 private:
  std::unique_ptr<Plan> plan_;
};

py::bytes to_bytes(const std::vector<uint8_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

// Plan.apply(srcs, dsts, accumulate=False, threads=1, call="Plan.apply", src_labels=None,
// dst_label="out"), parsed by hand (vectorcall: positional and keyword arguments).
PyObject* plan_apply(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const kNames[] = {"srcs", "dsts", "accumulate", "threads", "call", "src_labels", "dst_label"};
  constexpr Py_ssize_t kMax = 7;
  PyObject* a[kMax] = {nullptr, nullptr, Py_False, nullptr, nullptr, Py_None, nullptr};
  try {
    if (nargs > kMax) fail("Plan.apply takes at most 7 arguments, got " + std::to_string(nargs));
    for (Py_ssize_t i = 0; i < nargs; i++) a[i] = args[i];
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
      const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, i));
      Py_ssize_t slot = -1;
      for (Py_ssize_t n = 0; name && n < kMax; n++)
        if (std::strcmp(name, kNames[n]) == 0) slot = n;
      if (slot < 0 || slot < nargs)
        fail(std::string("Plan.apply: unexpected or repeated argument '") + (name ? name : "?") + "'");
      a[slot] = args[nargs + i];
    }
    if (!a[0] || !a[1]) fail("Plan.apply needs srcs and dsts");
    int accumulate = PyObject_IsTrue(a[2]);
    if (accumulate < 0) throw py::error_already_set();
    int threads = 1;
    if (a[3]) {
      long t = PyLong_AsLong(a[3]);
      if (t == -1 && PyErr_Occurred()) throw py::error_already_set();
      threads = t > 1 << 20 ? 1 << 20 : int(t);
    }
    py::detail::make_caster<PyPlan> caster;
    if (!caster.load(self, false)) fail("Plan.apply: self is not a Plan");
    PyPlan& plan = py::detail::cast_op<PyPlan&>(caster);
    size_t len = plan.apply(a[0], a[1], accumulate != 0, threads, a[4], a[5], a[6]);
    return PyLong_FromSize_t(len);
  } catch (const CodecFailure& e) {
    PyErr_SetString(g_codec_error, e.what());
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// none_indices(seq) -> tuple of the positions holding None (decode's missing shards):
// identity tests only, so no element's __eq__ runs (a numpy array's would not say no).
PyObject* none_indices(PyObject*, PyObject* seq) {
  PyObject* f = PySequence_Fast(seq, "none_indices: expected a sequence (the shards, None where missing)");
  if (f == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
  PyObject** items = PySequence_Fast_ITEMS(f);
  Py_ssize_t count = 0;
  for (Py_ssize_t i = 0; i < n; i++) count += items[i] == Py_None;
  PyObject* out = PyTuple_New(count);
  for (Py_ssize_t i = 0, k = 0; out != nullptr && i < n; i++) {
    if (items[i] != Py_None) continue;
    PyObject* v = PyLong_FromSsize_t(i);
    if (v == nullptr) {
      Py_CLEAR(out);
      break;
    }
    PyTuple_SET_ITEM(out, k++, v);
  }
  Py_DECREF(f);
  return out;
}

PyMethodDef kNoneIndicesDef = {"none_indices", none_indices, METH_O,
                               "none_indices(seq) -> tuple of the indices i where seq[i] is None."};

PyMethodDef kApplyDef = {
    "apply", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(plan_apply)),
    METH_FASTCALL | METH_KEYWORDS,
    "apply(srcs, dsts, accumulate=False, threads=1, call='Plan.apply', src_labels=None, dst_label='out')\\n"
    "dsts[r] (^= when accumulate) XOR_j coefs[r][j] * srcs[j]. Buffers: any C-contiguous buffer\\n"
    "protocol objects of one length; dsts writable and sharing no memory with srcs or each other.\\n"
    "Runs with the GIL released on up to `threads` threads. Returns the length. Errors name `call`,\\n"
    "the input by src_labels[j] (default 'shard j') and outputs as dst_label[r]."};

}  // namespace

PYBIND11_MODULE(_ec, m) {
  m.doc() = "ckpt Reed-Solomon codec core: GF(2^8) 0x11d, kernels per ISA level (docs/INTERNALS.md)";

  try {
    py::object cls = py::module_::import("ckpt.errors").attr("CodecError");
    g_codec_error = cls.release().ptr();
  } catch (py::error_already_set&) {
    PyErr_Clear();
    g_codec_error = PyErr_NewException("ckpt._ec.CodecError", PyExc_ValueError, nullptr);
  }
  m.attr("CodecError") = py::handle(g_codec_error);
  // The kernel level is chosen once, here at import (cpuid, xgetbv, CKPT_EC_ISA); a bad
  // CKPT_EC_ISA is reported by default_isa(), not by the import.
  default_isa(nullptr);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CodecFailure& e) {
      PyErr_SetString(g_codec_error, e.what());
    }
  });

  m.def("gf_mul_table", [] { return py::bytes(reinterpret_cast<const char*>(gf().mul), 65536); },
        "The 64 KiB product table: byte 256*a + b is a*b in GF(2^8) under 0x11d.");
  m.def("gf_inv_table", [] { return py::bytes(reinterpret_cast<const char*>(gf().inv), 256); },
        "Byte a is the inverse of a (byte 0 is 0).");
  m.def(
      "gfni_matrix", [](int c) {
        if (c < 0 || c > 255) fail("gfni_matrix: c must be a byte, got " + std::to_string(c));
        return gfni_matrix(static_cast<uint8_t>(c));
      },
      py::arg("c"), "The gf2p8affineqb bit matrix (a uint64) that multiplies a byte by c under 0x11d.");
  m.def(
      "nibble_table", [](int c) {
        if (c < 0 || c > 255) fail("nibble_table: c must be a byte, got " + std::to_string(c));
        std::vector<uint8_t> t(32);
        nibble_table(static_cast<uint8_t>(c), t.data());
        return to_bytes(t);
      },
      py::arg("c"), "The 32-byte PSHUFB table of c: c*x for x < 16, then c*(x << 4).");
  m.def(
      "cauchy_matrix", [](int k, int m) {
        check_km(k, m, "cauchy_matrix");
        return to_bytes(cauchy_matrix(k, m));
      },
      py::arg("k"), py::arg("m"), "The m x k Cauchy parity matrix C[i][j] = inv((k+i) ^ j), row-major.");
  m.def(
      "invert_matrix", [](py::handle a, int n) {
        if (n < 1 || n > 256) fail("invert_matrix: n must be between 1 and 256, got " + std::to_string(n));
        std::vector<uint8_t> in = bytes_of(a, "invert_matrix: a");
        if (in.size() != size_t(n) * n)
          fail("invert_matrix: a has " + std::to_string(in.size()) + " bytes; expected n*n = " +
               std::to_string(n * n));
        std::vector<uint8_t> out(in.size());
        if (!invert_matrix(in.data(), n, out.data())) fail("invert_matrix: the matrix is singular");
        return to_bytes(out);
      },
      py::arg("a"), py::arg("n"), "Inverse of the n x n matrix a (row-major bytes); CodecError if singular.");
  m.def(
      "check_mds", [](py::handle matrix, int k, int m, uint64_t max_dets) {
        check_km(k, m, "check_mds");
        std::vector<uint8_t> c = matrix_of(matrix, k, m, "check_mds");
        std::vector<int> rows, cols;
        int r;
        {
          py::gil_scoped_release nogil;
          r = check_mds(c.data(), k, m, max_dets, &rows, &cols);
        }
        return py::make_tuple(r, rows, cols);
      },
      py::arg("matrix"), py::arg("k"), py::arg("m"), py::arg("max_dets") = uint64_t(1) << 20,
      "(1, [], []) when every square submatrix of C is nonsingular; (0, rows, cols) naming a singular\n"
      "one; (-1, [], []) when checking would take more than max_dets determinants.");
  m.def(
      "recovery_matrix",
      [](py::handle matrix, int k, int m, std::vector<int> survivors, std::vector<int> wanted) {
        check_km(k, m, "recovery_matrix");
        std::vector<uint8_t> c = matrix_of(matrix, k, m, "recovery_matrix");
        if (survivors.size() != size_t(k))
          fail("recovery_matrix: " + std::to_string(survivors.size()) + " survivors; need exactly k = " +
               std::to_string(k));
        for (int s : survivors)
          if (s < 0 || s >= k + m) fail("recovery_matrix: survivor index " + std::to_string(s) + " out of range");
        for (int w : wanted)
          if (w < 0 || w >= k + m) fail("recovery_matrix: wanted index " + std::to_string(w) + " out of range");
        std::vector<uint8_t> out;
        if (!recovery_matrix(c.data(), k, m, survivors, wanted, &out)) {
          std::string s;
          for (int i : survivors) s += (s.empty() ? "" : ", ") + std::to_string(i);
          fail("the parity matrix is not MDS: shards [" + s +
               "] cannot rebuild the others (their k x k submatrix is singular); use the Cauchy default");
        }
        return to_bytes(out);
      },
      py::arg("matrix"), py::arg("k"), py::arg("m"), py::arg("survivors"), py::arg("wanted"),
      "Rows (len(wanted) x k) rebuilding shards `wanted` from the k shards `survivors` of [I; C].");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i < kNumIsa; i++)
      if (kernels_for(i)) out.push_back(isa_name(i));
    return out;
  }, "Kernel levels this CPU and build can run, best last.");
  m.def("compiled_isas", [] {
    std::vector<std::string> out = {"scalar"};
    if (kernels_ssse3()) out.push_back("ssse3");
    if (kernels_avx2()) out.push_back("avx2");
    if (kernels_avx512()) out.push_back("avx512");
    if (kernels_gfni(false)) out.push_back("gfni");
    if (kernels_neon()) out.push_back("neon");
    return out;
  }, "Kernel levels compiled into this build (whether or not this CPU runs them).");
  m.def("default_isa", [] {
    std::string err;
    int isa = default_isa(&err);
    if (isa < 0) fail(err);
    return std::string(isa_name(isa));
  }, "The best usable level at or below the CKPT_EC_ISA cap (read once).");
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["ssse3"] = f.ssse3;
    d["avx2"] = f.avx2;
    d["avx512bw"] = f.avx512bw;
    d["gfni"] = f.gfni;
    d["neon"] = f.neon;
    return d;
  }, "What cpuid and xgetbv report (each feature only when the OS also saves its registers).");

  py::class_<PyPlan> plan_cls(m, "Plan",
                              "A coefficient matrix (rows x cols) prepared for one kernel level. apply() computes\n"
                              "dst[r] (^)= XOR_j coefs[r][j] * src[j] over equal-length buffers. Thread-safe.");
  plan_cls.def(py::init<py::handle, int, int, const std::string&>(), py::arg("coefs"), py::arg("rows"),
           py::arg("cols"), py::arg("isa"))
      .def_property_readonly("rows", [](const PyPlan& p) { return p.plan().rows(); })
      .def_property_readonly("cols", [](const PyPlan& p) { return p.plan().cols(); })
      .def_property_readonly("isa", [](const PyPlan& p) { return std::string(isa_name(p.plan().isa())); })
      .def_property_readonly("coefs", [](const PyPlan& p) { return to_bytes(p.plan().coefs()); });
  // apply is the codec's per-call path: a METH_FASTCALL method instead of a pybind11 one
  // (whose dispatch took about half of a small call's ~1.2 us).
  PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(plan_cls.ptr()), &kApplyDef);
  if (descr == nullptr) throw py::error_already_set();
  plan_cls.attr("apply") = py::reinterpret_steal<py::object>(descr);
  PyObject* fn = PyCFunction_NewEx(&kNoneIndicesDef, nullptr, m.ptr());
  if (fn == nullptr) throw py::error_already_set();
  m.attr("none_indices") = py::reinterpret_steal<py::object>(fn);
}
