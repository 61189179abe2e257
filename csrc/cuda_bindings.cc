// pybind11 bindings of ckpt._C_cuda (docs/INTERNALS.md section 1, CUDA parts).
// Built by the host compiler and linked with cuda_copy.o and the static cudart,
// so importing it needs no GPU and no driver; available() says whether one is usable.
#include <pybind11/pybind11.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cuda_copy.h"

namespace py = pybind11;

namespace {

PyObject* g_native_error = nullptr;

struct CudaFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& msg) { throw CudaFailure(msg); }

void check(int err, const std::string& call, const std::string& what) {
  if (err != 0)
    fail(call + ": " + what + " failed: " + ckpt_cuda::error_string(err) + " (cudaError " + std::to_string(err) + ")");
}

uint64_t as_u64(py::handle h, const std::string& call, const std::string& what) {
  if (!PyLong_Check(h.ptr())) fail(call + ": " + what + " must be an int");
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow != 0 || v < 0) fail(call + ": " + what + " = " + std::string(py::str(h)) + " must be >= 0 and < 2**63");
  return static_cast<uint64_t>(v);
}

// The event recorded after a batch of copies; destroyed with the last reference.
struct Event {
  void* ev = nullptr;
  int device = 0;
  ~Event() {
    if (ev) ckpt_cuda::event_destroy(ev);
  }
};

class CudaTicket {
 public:
  CudaTicket(std::shared_ptr<Event> e, uint64_t bytes) : event_(std::move(e)), bytes_total_(bytes) {}

  bool done() {
    if (!event_->ev) return true;
    int r = ckpt_cuda::event_query(event_->ev);
    if (r == ckpt_cuda::kNotReady) return false;
    check(r, "CudaTicket.done", "cudaEventQuery");
    return true;
  }

  // Polls with the GIL released (the caller releases it) with a short backoff.
  bool wait(double timeout_s) {
    auto start = std::chrono::steady_clock::now();
    auto sleep = std::chrono::microseconds(20);
    for (;;) {
      if (done()) return true;
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (timeout_s >= 0 && elapsed >= timeout_s) return false;
      std::this_thread::sleep_for(sleep);
      if (sleep < std::chrono::microseconds(1000)) sleep *= 2;
    }
  }

  void make_stream_wait(uint64_t stream) {
    if (!event_->ev) return;
    check(ckpt_cuda::stream_wait_event(event_->device, stream, event_->ev), "CudaTicket.make_stream_wait",
          "cudaStreamWaitEvent");
  }

  uint64_t bytes_total() const { return bytes_total_; }
  int device() const { return event_->device; }

 private:
  std::shared_ptr<Event> event_;
  uint64_t bytes_total_;
};

class CudaCopier {
 public:
  explicit CudaCopier(int device) : device_(device) {
    int n = 0;
    int err = ckpt_cuda::device_count(&n);
    if (err != 0 || n == 0)
      fail(std::string("CudaCopier: no usable CUDA device (") +
           (err ? ckpt_cuda::error_string(err) : "device count is 0") + "); use the CPU CopyEngine instead");
    if (device < 0 || device >= n)
      fail("CudaCopier(device=" + std::to_string(device) + "): there are " + std::to_string(n) + " devices");
  }

  CudaTicket copy(const char* call, py::handle jobs, py::handle side_stream, py::handle wait_stream,
                  uint64_t chunk_bytes = 0, uint64_t crc_out = 0) {
    std::vector<ckpt_cuda::Job> v;
    uint64_t total = 0;
    auto seq = py::reinterpret_borrow<py::sequence>(jobs);
    for (size_t i = 0; i < seq.size(); i++) {
      py::object item = seq[i];
      std::string where = "job " + std::to_string(i);
      if (!py::isinstance<py::sequence>(item) || py::len(item) != 3)
        fail(std::string(call) + ": " + where + " must be a tuple (src_addr, dst_addr, nbytes)");
      auto t = py::reinterpret_borrow<py::sequence>(item);
      ckpt_cuda::Job j{as_u64(t[0], call, where + " src_addr"), as_u64(t[1], call, where + " dst_addr"),
                       as_u64(t[2], call, where + " nbytes")};
      if (j.nbytes && (j.src == 0 || j.dst == 0)) fail(std::string(call) + ": " + where + " has a null address");
      total += j.nbytes;
      v.push_back(j);
    }
    uint64_t side = as_u64(side_stream, call, "side_stream");
    // None: no ordering. Any int, 0 (the legacy default stream) included, is waited on.
    const bool has_wait = !wait_stream.is_none();
    uint64_t waits = has_wait ? as_u64(wait_stream, call, "wait_stream") : 0;
    if (side == 0) fail(std::string(call) + ": side_stream must be a non-default stream (torch.cuda.Stream().cuda_stream)");
    auto ev = std::make_shared<Event>();
    ev->device = device_;
    const char* failed = "";
    int err;
    {
      py::gil_scoped_release nogil;
      err = ckpt_cuda::enqueue_copies(device_, v.data(), v.size(), side, has_wait, waits, chunk_bytes, crc_out,
                                      &ev->ev, &failed);
    }
    check(err, call, failed);
    return CudaTicket(ev, total);
  }

  int device() const { return device_; }

 private:
  int device_;
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ckpt CUDA copier (statically linked cudart; importable without a GPU)";
  try {
    py::object cls = py::module_::import("ckpt.errors").attr("NativeError");
    g_native_error = cls.release().ptr();
  } catch (py::error_already_set&) {
    PyErr_Clear();
    g_native_error = PyErr_NewException("ckpt._C_cuda.NativeError", PyExc_RuntimeError, nullptr);
  }
  m.attr("NativeError") = py::handle(g_native_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CudaFailure& e) {
      PyErr_SetString(g_native_error, e.what());
    }
  });

  m.def("device_count", [] {
    int n = 0;
    ckpt_cuda::device_count(&n);
    return n;
  }, "Number of usable CUDA devices (0 without a driver or GPU).");
  m.def("available", [] {
    int n = 0;
    return ckpt_cuda::device_count(&n) == 0 && n > 0;
  }, "True when at least one CUDA device is usable.");
  m.def(
      "host_register",
      [](py::handle addr, py::handle nbytes) {
        uint64_t a = as_u64(addr, "host_register", "addr"), n = as_u64(nbytes, "host_register", "nbytes");
        int err;
        {
          py::gil_scoped_release nogil;
          err = ckpt_cuda::host_register(reinterpret_cast<void*>(a), n);
        }
        check(err, "host_register", "cudaHostRegister(" + std::to_string(n) + " bytes)");
      },
      py::arg("addr"), py::arg("nbytes"), "Page-lock host memory so DMA copies run at full speed.");
  m.def(
      "host_unregister",
      [](py::handle addr) {
        uint64_t a = as_u64(addr, "host_unregister", "addr");
        int err;
        {
          py::gil_scoped_release nogil;
          err = ckpt_cuda::host_unregister(reinterpret_cast<void*>(a));
        }
        check(err, "host_unregister", "cudaHostUnregister");
      },
      py::arg("addr"));

  py::class_<CudaTicket>(m, "CudaTicket", "Completion of one batch of copies (a CUDA event).")
      .def("done", &CudaTicket::done)
      .def(
          "wait",
          [](CudaTicket& t, py::object timeout_s) {
            double to = timeout_s.is_none() ? -1.0 : py::cast<double>(timeout_s);
            if (!timeout_s.is_none() && !(to >= 0)) fail("CudaTicket.wait: timeout_s must be >= 0 or None");
            py::gil_scoped_release nogil;
            return t.wait(to);
          },
          py::arg("timeout_s") = py::none(), "Poll until done or timeout_s passes (None: forever). GIL released.")
      .def(
          "make_stream_wait",
          [](CudaTicket& t, py::handle stream) { t.make_stream_wait(as_u64(stream, "CudaTicket.make_stream_wait", "stream")); },
          py::arg("stream"), "Make `stream` wait for these copies on the device; the host does not block.")
      .def_property_readonly("bytes_total", &CudaTicket::bytes_total)
      .def_property_readonly("device", &CudaTicket::device, "The device whose copies this ticket tracks.");

  py::class_<CudaCopier>(m, "CudaCopier", "Enqueues D2H/H2D copies on a side stream, ordered by events.")
      .def(py::init<int>(), py::arg("device") = 0)
      .def_property_readonly("device", &CudaCopier::device)
      .def(
          "d2h",
          [](CudaCopier& c, py::handle jobs, py::handle side_stream, py::handle wait_stream,
             py::handle chunk_bytes, py::handle crc_out) {
            const char* call = "CudaCopier.d2h";
            uint64_t chunk = as_u64(chunk_bytes, call, "chunk_bytes"), out = as_u64(crc_out, call, "crc_out");
            if ((chunk == 0) != (out == 0)) fail(std::string(call) + ": give both chunk_bytes and crc_out, or neither");
            if (chunk % 4) fail(std::string(call) + ": chunk_bytes must be a multiple of 4, got " + std::to_string(chunk));
            return c.copy(call, jobs, side_stream, wait_stream, chunk, out);
          },
          py::arg("jobs"), py::arg("side_stream"), py::arg("wait_stream") = py::none(), py::arg("chunk_bytes") = 0,
          py::arg("crc_out") = 0,
          "jobs: [(device_src, host_dst, nbytes)]. side_stream first waits for work already queued on "
          "wait_stream (an int handle; 0 is the legacy default stream, waited on like any other; None: "
          "no ordering), then copies; returns at once. With chunk_bytes and crc_out (a host address), the "
          "crc32c of every chunk of each source (job order, each job starting a chunk) is computed on the "
          "device first and written there as uint32s, as CopyEngine.submit does.")
      .def(
          "h2d",
          [](CudaCopier& c, py::handle jobs, py::handle side_stream, py::handle wait_stream) {
            return c.copy("CudaCopier.h2d", jobs, side_stream, wait_stream);
          },
          py::arg("jobs"), py::arg("side_stream"), py::arg("wait_stream") = py::none(),
          "jobs: [(host_src, device_dst, nbytes)], for restore; same ordering as d2h.");
}
